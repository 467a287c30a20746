"""Golden runners for the sampling area (registered into `golden.RUNNERS`)."""

from golden import Case, runner  # noqa: F401
