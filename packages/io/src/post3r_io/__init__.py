"""post3r-io: the project's one rule for writing files (atomic, durable, umask mode).

Every package that writes results (backbone conversions, data shards, training checkpoints and
logs) depends on this small standard-library-only package, so the rule lives in one place.
"""

from post3r_io.atomic import atomic_path, atomic_write, atomic_write_text, fsync_directory

__all__ = ["atomic_path", "atomic_write", "atomic_write_text", "fsync_directory"]
