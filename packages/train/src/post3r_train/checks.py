"""The package's one set of validation helpers: each raises `ConfigError` (a ValueError) with a
message that names the key at fault."""

from __future__ import annotations

from collections.abc import Collection

from post3r_train.errors import ConfigError


def require(condition: bool, message: str) -> None:
    """Raise `ConfigError(message)` unless `condition` holds."""
    if not condition:
        raise ConfigError(message)


def require_one_of(value: object, choices: Collection[str], key: str) -> None:
    """`key`'s `value` must be one of `choices`."""
    require(value in choices, f"{key}={value!r} is not one of {', '.join(choices)}")


def require_positive(value: float | None, key: str) -> None:
    """`key`'s `value` must be > 0 (None: not set, nothing to check)."""
    require(value is None or value > 0, f"{key} must be > 0, got {value}")
