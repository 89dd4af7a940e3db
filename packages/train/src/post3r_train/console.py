"""How the apps report a user's error: one line on stderr, no traceback, a non-zero exit."""

from __future__ import annotations

import sys

from post3r_backbone.errors import BackboneError
from post3r_data.errors import DataError
from post3r_train.errors import TrainError

# Every error class the packages raise on purpose, and the OS's (a read-only or full disk, a
# missing file), is one line on the console with no traceback (-v shows it where an app has it).
CONSOLE_ERRORS: tuple[type[Exception], ...] = (
    TrainError,
    DataError,
    BackboneError,
    OSError,
    ValueError,
    KeyError,
    RuntimeError,
)


def one_line(error: BaseException) -> str:
    """The message of an error for the console (a KeyError's repr would add quotes)."""
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror} (check the path and its permissions)"
    return str(error)


def report_error(error: BaseException, hint: str = "") -> int:
    """Print `error` as one line (plus `hint`) on stderr; the exit status for a user's error."""
    print(f"error: {one_line(error)}{hint}", file=sys.stderr)
    return 1
