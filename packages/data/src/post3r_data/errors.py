"""The errors post3r_data raises on purpose: one base class, `DataError`, catches them all."""

from __future__ import annotations


class DataError(Exception):
    """Base of every error this package raises on purpose."""


class CorruptSampleError(DataError, ValueError):
    """A shard sample that cannot be decoded or has inconsistent arrays."""


class CorruptShardError(DataError, ValueError):
    """A shard file that cannot be read to its end."""
