"""One command at a time in a folder: an exclusive lock that a killed process never leaves behind.

`hold(folder, command)` locks `folder/.lock` with flock(2). The kernel drops the lock when the holding
process ends, however it ends (SIGKILL included), so a killed run never blocks its rerun. The file
records the holder (pid, host, start time, command) for the one-line error a second command prints;
the file itself stays (deleting a lock file while another process opens it would let two hold it).

On a filesystem without locks (flock fails with ENOLCK/EOPNOTSUPP) the folder is used unlocked,
with a warning. Over NFS, flock is forwarded to the server; if the holder's node died, the server
frees the lock when its lease ends, or the user deletes the file as the error says.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".lock"
_held: dict[str, int] = {}  # resolved lock path -> open descriptor, for this process


class FolderInUse(FileExistsError):
    """Another live process holds the folder's lock (a FileExistsError: one line on the CLI)."""


def hold(folder: str | os.PathLike, command: str) -> Path:
    """Lock `folder` (created if needed) for this process until `release(folder)` or exit.

    Raises FolderInUse naming the holder. Locking a folder this process already holds (a previous
    command in the same process ended by an exception) takes it over."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    release(folder)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FolderInUse(f"{folder} is in use by {holder(path)}; wait for it to end or stop it. If no such "
                          f"process is running (e.g. its node died), delete {path} and rerun") from None
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        print(f"warning: {path}: this filesystem has no file locks ({e.strerror}); nothing stops a second "
              f"command from using {folder} at the same time", file=sys.stderr)
        return path
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    _held[str(path.resolve())] = fd
    return path


def release(folder: str | os.PathLike) -> None:
    """Drop this process's lock on `folder` (a no-op when it holds none)."""
    fd = _held.pop(str((Path(folder) / LOCK_FILE).resolve()), None)
    if fd is not None:
        os.close(fd)


def holder(path: str | os.PathLike) -> str:
    """Who holds the lock file, in words (what it records)."""
    try:
        h = json.loads(Path(path).read_text())
        return f"`{h['command']}` (pid {h['pid']} on host {h['host']}, since {h['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not recorded itself yet)"
