"""Atomic writes: a reader sees the old file or the whole new one, never a part.

The rule, for every file the project writes: write a temporary file in the target's directory
(same file system, so the rename is atomic), fsync it, give it the mode a plain `open` would
(0666 minus the umask: mkstemp's 0600 would hide results from the group on a shared cluster),
rename it over the target, then fsync the directory so the rename survives a crash. If writing
fails (an exception, a full disk), the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to `path` for a writer that takes a file name (e.g. safetensors);
    when the block ends without an exception, the file is fsync'ed and renamed over `path`."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    os.close(fd)
    try:
        yield tmp
        # After the writer: some (safetensors) create their file 0600 whatever was there.
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def atomic_write(
    path: str | os.PathLike, write: Callable[[IO[bytes]], object], *, make_parents: bool = False
) -> Path:
    """Write `path` through `write(file)` (a binary file object) atomically and durably;
    `make_parents` creates its folder first. Returns `path`."""
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        write(file)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, make_parents: bool = False) -> Path:
    """`atomic_write` of UTF-8 text."""
    return atomic_write(path, lambda file: file.write(text.encode()), make_parents=make_parents)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as file:
        os.fsync(file.fileno())


def fsync_directory(directory: str | os.PathLike) -> None:
    """Persist renames in `directory` (POSIX); harmless where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@functools.cache
def _umask() -> int:
    """The process umask (read once: reading it means setting it, briefly)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
