"""Fault injection for the resume tests: SIGKILL a real subprocess at a known point."""

import signal
import subprocess
import time
from pathlib import Path


def wait_until_exists(proc: subprocess.Popen, path: Path, timeout: float = 120) -> None:
    """Return once `path` exists, `proc` still running (e.g. paused after the checkpoint it names)."""
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, f"the run ended or stalled before {path} existed"
        time.sleep(0.2)


def sigkill_when_exists(proc: subprocess.Popen, path: Path, timeout: float = 120) -> None:
    """SIGKILL `proc` once `path` exists (e.g. a checkpoint written before the run pauses there)."""
    wait_until_exists(proc, path, timeout)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
