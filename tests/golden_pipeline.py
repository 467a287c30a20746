"""Golden runners for the pipeline area (registered into `golden.RUNNERS`)."""

from golden import Case, runner  # noqa: F401
