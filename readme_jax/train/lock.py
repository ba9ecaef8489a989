"""One run per run folder: an exclusive ``fcntl.flock`` on ``<run_dir>/.lock`` for the whole run.

    with RunLock(run_dir):           # RunLockError at once if another live process holds it
        ...every stage...

Process 0 of a multi-host job takes the lock (the others share its run); the OS releases it when the process
ends, however it ends, so a killed run never leaves a stale lock and the same command resumes. The file
holds the holder's pid (for the message only; the lock itself is the ``flock``). A filesystem on which
``flock`` does not work (some network mounts) is refused rather than silently shared.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from readme_jax.errors import RunLockError

LOCK_FILE = ".lock"


class RunLock:
    """The exclusive lock of one run folder (a context manager; ``enabled=False``: a no-op, for the
    processes of a multi-host job other than process 0)."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True):
        self.dir, self.enabled = Path(run_dir), enabled
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.dir / LOCK_FILE

    def acquire(self) -> None:
        if not self.enabled:
            return
        if self.dir.exists() and not self.dir.is_dir():
            raise RunLockError(f"{self.dir}: --run-dir is a file, expected a folder (or a path that does not exist)")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunLockError(f"{self.dir}: cannot create the run folder's lock file ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f"pid {holder}" if holder else "another process"
                raise RunLockError(f"{self.dir}: in use by another run ({who}); wait for it to finish or use "
                                   "another --run-dir") from None
            raise RunLockError(f"{self.dir}: this filesystem does not support file locks ({e.strerror}); "
                               "put the run folder on a local disk") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)          # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
