"""Golden runners for the models area (registered into `golden.RUNNERS`)."""

from golden import Case, runner  # noqa: F401
