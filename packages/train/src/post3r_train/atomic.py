"""Atomic file writes for post3r_train: the project's one rule, which lives in post3r-io.

A write goes to a temporary file in the target's folder, is fsync'ed, given the umask's mode,
renamed over the target, and the folder is fsync'ed, so a crash, SIGKILL or full disk leaves the
previous file intact. post3r-backbone and post3r-data write through the same functions.
"""

from post3r_io import atomic_path, atomic_write, atomic_write_text, fsync_directory

__all__ = ["atomic_path", "atomic_write", "atomic_write_text", "fsync_directory"]
