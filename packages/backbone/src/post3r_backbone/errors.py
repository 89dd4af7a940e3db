"""The errors post3r_backbone raises: one base class, `BackboneError`, catches them all."""

from __future__ import annotations


class BackboneError(Exception):
    """Base of every error this package raises on purpose."""


class TTT3RConfigError(BackboneError, ValueError):
    """A configuration value, key or constructor string that this package cannot build."""


class TTT3RCheckpointError(BackboneError, ValueError):
    """A checkpoint that does not fit the model: wrong, missing or mis-shaped keys, bad content."""


class TTT3RCheckpointNotFoundError(BackboneError, FileNotFoundError):
    """The checkpoint file does not exist; the message says where to get it and where to put it."""
