"""Exclusive locks on a folder (a feature cache, a run folder): one holder per lock file at a time.

A second command on the same folder stops at once with one line naming the holder (pid, host,
start time, command) and how to clear a stale lock. A lock left by a killed process never blocks:

- On file systems with `flock` (local disks, NFS with a lock manager) the kernel drops the lock when
  its process dies, whatever the signal, so a leftover lock file is free to take.
- Where `flock` is not available, the lock file is created exclusively and a holder on this host
  whose process is gone (dead pid, or a pid reused by a later process, or a reboot) is replaced.
  A holder on another host cannot be checked from here: the error says to delete the file once that
  process is known to be gone.

Lock files are dot-files inside the folder (`.reglue-<name>.lock`), so they never count as the
folder's contents. Object-store URLs (s3://...) have no lock: `Lock` is then a no-op (docs/extract.md).

    with Lock("cache/in1k.zarr", "extract-rank0"):
        ...  # raises LockHeld (a FileExistsError) if another live process holds it
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: the pid scheme only
    fcntl = None


class LockHeld(FileExistsError):
    """Another live process holds the lock (the message names it and the fix)."""


def is_local(url: str) -> bool:
    """Whether `url` is a path on a mounted file system (where a lock file means something)."""
    return "://" not in str(url) or str(url).startswith("file://")


def _boot_id() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return ""


def _process_start(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (Linux), to tell it from a later process with the same pid."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def this_process() -> dict:
    """The holder record written into a lock file."""
    pid, program = os.getpid(), Path(sys.argv[0]).name
    program = "reglue" if program == "cli.py" else program  # `python -m reglue.cli ...` (torchrun, accelerate)
    return {"pid": pid, "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join([program, *sys.argv[1:]])[:300], "boot": _boot_id(), "start": _process_start(pid)}


def holder_gone(holder: dict) -> bool:
    """True when `holder` is known to be dead: same host and (other boot, dead pid, or reused pid)."""
    if holder.get("host") != socket.gethostname():
        return False  # cannot be checked from here
    if holder.get("boot") and holder.get("boot") != _boot_id():
        return True
    pid = int(holder.get("pid", -1))
    if pid <= 0 or not _alive(pid):
        return True
    return holder.get("start") is not None and _process_start(pid) not in (None, holder["start"])


def describe(holder: dict | None, path: Path) -> str:
    if not holder:
        who = "another process (it has not written its name yet)"
    else:
        who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} "
               f"(`{holder.get('command', '?')}`)")
    return (f"{path.parent} is in use by {who}; wait for it to finish. If that process is gone (e.g. killed "
            f"on another machine), delete {path} and rerun")


class Lock:
    """An exclusive lock held through a dot-file `.reglue-<name>.lock` in `folder` (created if absent;
    a folder this lock created is removed again on release if it is then empty)."""

    def __init__(self, folder: str | os.PathLike, name: str):
        self.local = is_local(str(folder))
        self.folder = Path(str(folder).removeprefix("file://"))
        self.path = self.folder / f".reglue-{name}.lock"
        self._fd: int | None = None
        self._created_folder = False

    def acquire(self) -> Lock:
        if not self.local or self._fd is not None:
            return self
        if not self.folder.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            self._created_folder = True
        try:
            self._fd = self._flock() if fcntl else None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            self._fd = None
        if self._fd is None:
            self._fd = self._exclusive_create()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(this_process()).encode(), 0)
        return self

    def _flock(self) -> int:
        """Open and flock the lock file; retry if it was replaced meanwhile (a releasing holder unlinks it)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(self.path)
                os.close(fd)
                raise LockHeld(describe(holder, self.path)) from None
            except OSError:
                os.close(fd)
                raise
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def _exclusive_create(self) -> int:
        """Without flock: create the file exclusively, replacing it if its holder is known to be gone."""
        while True:
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                if holder is None or not holder_gone(holder):
                    raise LockHeld(describe(holder, self.path)) from None
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # before closing, so that no one else holds the lock of a removed file
        os.close(self._fd)
        self._fd = None
        if self._created_folder:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only if empty: nothing else was written

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(path: Path) -> dict | None:
    """The holder record in a lock file (None if empty, unreadable or half-written)."""
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text() or "null")
    return None
