"""One job per run directory: an advisory lock (`run.lock`) that dies with its holder.

Two jobs writing one run directory (a SLURM requeue plus a manual resubmit, two `--continue`)
would interleave metric rows and overwrite each other's checkpoints. The job that trains in a
run directory holds `fcntl.flock` on `<run>/run.lock` (rank 0 only; the other ranks write no
shared files). The kernel drops the lock when the holder exits or is killed, so a killed job
never leaves the directory locked, and a requeued job (which starts after the old one died)
finds it free. The file holds the holder's pid, host, start time and SLURM job, for the error
the next job gets; it is removed on release, so a run directory looks the same before and after.
File systems without flock (Lustre mounted without `flock`) get a warning and no lock.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import logging
import os
import socket
import sys
from pathlib import Path

from post3r_train.errors import RunDirLockedError

log = logging.getLogger("post3r_train.engine")

LOCK_NAME = "run.lock"
_NO_LOCKS = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP}


class RunLock:
    """The held lock of one run directory (`acquire`, then `release` or a `with` block)."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, run_root: Path) -> RunLock:
        """Lock `run_root` for this process, or raise RunDirLockedError naming the holder."""
        path = Path(run_root) / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise RunDirLockedError(_locked_message(Path(run_root), holder)) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno not in _NO_LOCKS:
                    raise
                log.warning("%s: the file system has no flock (%s); not locking the run", path, exc)
                return cls(path, None)
            if _same_file(path, fd):  # not a file a releasing holder has just removed
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, _holder_text().encode())
        os.fsync(fd)
        return cls(path, fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still held: a waiting job then re-opens a new file
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(run_root: Path) -> str | None:
    """Who holds `run_root`'s lock (the holder's description), or None when it is free."""
    path = Path(run_root) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read(fd) or "a job that is just starting"
    except OSError:
        return None
    finally:
        os.close(fd)  # also drops a shared lock taken above
    return None


def check_unlocked(run_root: Path) -> None:
    """Raise RunDirLockedError when another job holds `run_root` (a check before starting)."""
    holder = lock_holder(run_root)
    if holder is not None:
        raise RunDirLockedError(_locked_message(Path(run_root), holder))


def _locked_message(run_root: Path, holder: str) -> str:
    return (
        f"{run_root} is in use by another job ({holder or 'a job that is just starting'}): one "
        "job trains in a run directory at a time. Wait for it to end or stop it (a killed job "
        "releases the run by itself), then --continue again"
    )


def _holder_text() -> str:
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    parts = [f"pid {os.getpid()}", f"host {socket.gethostname()}", f"started {started}"]
    if os.environ.get("SLURM_JOB_ID"):
        parts.append(f"SLURM job {os.environ['SLURM_JOB_ID']}")
    parts.append("command " + " ".join(sys.argv))
    return ", ".join(parts)


def _read(fd: int) -> str:
    with contextlib.suppress(OSError):
        return os.pread(fd, 4096, 0).decode(errors="replace").strip()
    return ""


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
