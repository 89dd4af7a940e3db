"""The errors post3r_train raises on purpose: one base class, `TrainError`, catches them all.

Each also derives from the built-in error it refines (ValueError, FileNotFoundError, ...), so
code that catches those keeps working. Each message names the thing at fault and the fix.
"""

from __future__ import annotations


class TrainError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(TrainError, ValueError):
    """A run config file, key or value that cannot be used; the message names it and the fix."""


class MissingWeightsError(TrainError, FileNotFoundError):
    """Pretrained weights were asked for but the file is not there."""


class MissingTargetError(TrainError, KeyError):
    """The batch lacks the ground truth `GroundTruthTargets` reads."""


class CheckpointError(TrainError, RuntimeError):
    """A training checkpoint is missing, unreadable, or not one of ours."""


class CheckpointWriteError(TrainError, RuntimeError):
    """A checkpoint could not be written (the previous one is intact)."""


class StateDictMismatchError(TrainError, ValueError):
    """A state dict does not fit the module: missing, unexpected or mis-shaped keys."""


class NonFiniteLossError(TrainError, RuntimeError):
    """The loss or the gradient was NaN/inf and `trainer.nan_policy` says stop."""


class TeacherCacheError(TrainError, RuntimeError):
    """A teacher cache that is missing, unfinished or made by another teacher or other data."""


class RunDirLockedError(TrainError, RuntimeError):
    """Another job trains in this run directory (it holds `run.lock`)."""
