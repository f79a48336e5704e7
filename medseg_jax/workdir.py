"""The run's folder: created, checked writable, and locked while a run uses it.

The lock is an ``fcntl.flock`` on ``<workdir>/.lock``, held by the run's
process (process 0 on several hosts). The kernel drops it when that process
ends, however it ends (SIGKILL included), so a lock file left by a dead run
never blocks the next one. The file holds the holder's pid and host, for the
message a second run gets.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import tempfile
from typing import Iterator

LOCK_NAME = ".lock"

_held: dict[str, int] = {}  # real path -> depth: re-entrant within one process


class WorkdirInUse(RuntimeError):
    """Another live process holds the workdir's lock."""


def _open_lock_file(workdir: str) -> int:
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise type(e)(f"--workdir {workdir}: cannot create it ({e.strerror})") from e
    path = os.path.join(workdir, LOCK_NAME)
    try:
        fd, probe = tempfile.mkstemp(dir=workdir, prefix=".probe_")  # can we write here?
        os.close(fd)
        os.unlink(probe)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        raise type(e)(f"--workdir {workdir}: not writable ({e.strerror}{where})") from e


def _holder(fd: int) -> str:
    text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    return text or "holder unknown"


@contextlib.contextmanager
def lock(workdir: str, enabled: bool = True) -> Iterator[None]:
    """Creates ``workdir`` and holds its lock; raises WorkdirInUse if another run has it.

    ``enabled=False`` (hosts other than process 0) only creates the folder.
    """
    key = os.path.realpath(workdir)
    if not enabled:
        os.close(_open_lock_file(workdir))
        yield
        return
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    fd = _open_lock_file(workdir)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirInUse(
                f"--workdir {workdir} is in use by another run ({_holder(fd)}; lock file "
                f"{os.path.join(workdir, LOCK_NAME)}); wait for it to end or use another "
                "--workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
    finally:
        os.close(fd)  # releases the flock; the file stays (another run may have it open)
