"""`reglue.lock`: one holder per lock, named in one line; a killed holder never blocks (issue 12 item 5)."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from reglue import lock as lockmod
from reglue.lock import Lock, LockHeld


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    folder = tmp_path / "store"
    with Lock(folder, "store-rank0"):
        with pytest.raises(LockHeld, match=rf"in use by pid {os.getpid()} on {socket.gethostname()} since") as e:
            Lock(folder, "store-rank0").acquire()
        assert "delete" in str(e.value) and ".reglue-store-rank0.lock" in str(e.value) and "\n" not in str(e.value)
        with Lock(folder, "store-rank1"):  # another rank's lock is another lock
            pass
    with Lock(folder, "store-rank0"):  # released: free again
        pass
    assert not folder.exists()  # the lock created the folder and nothing else was written: removed again


def test_the_lock_of_a_killed_process_does_not_block(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from reglue.lock import Lock
        Lock({str(tmp_path)!r}, "x").acquire()
        print("held", flush=True)
        time.sleep(60)""")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match=f"pid {holder.pid} "):
            Lock(tmp_path, "x").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((tmp_path / ".reglue-x.lock").read_text())["pid"] == holder.pid  # left behind
    with Lock(tmp_path, "x"):
        assert json.loads((tmp_path / ".reglue-x.lock").read_text())["pid"] == os.getpid()


def test_without_flock_a_dead_holder_on_this_host_is_replaced(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "no locks available")

    monkeypatch.setattr(lockmod.fcntl, "flock", no_flock)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / ".reglue-x.lock"
    record = lockmod.this_process()
    path.write_text(json.dumps(record | {"pid": dead.pid, "start": None}))
    with Lock(tmp_path, "x"):  # dead pid on this host: replaced
        with pytest.raises(LockHeld, match=f"pid {os.getpid()} "):
            Lock(tmp_path, "x").acquire()  # live holder
    path.write_text(json.dumps(record | {"host": "node-17"}))
    with pytest.raises(LockHeld, match=f"on node-17 .* delete {path}"):  # cannot be checked from here
        Lock(tmp_path, "x").acquire()
    path.write_text(json.dumps(record | {"start": -5}))  # our pid, but another process's start time: reused pid
    with Lock(tmp_path, "x"):
        pass


def test_object_store_urls_take_no_lock():
    with Lock("s3://bucket/cache.zarr", "x") as held:
        assert not held.local
