"""Optional dependencies: imported where they are used, with an error that says how to get them."""

from __future__ import annotations

import importlib
from types import ModuleType

# module -> the post3r-slots extra that installs it
_EXTRAS = {"post3r_kernels": "rope", "scipy.optimize": "matching"}


def require(module: str, feature: str) -> ModuleType:
    """Import `module` for `feature`, or raise an ImportError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        extra = _EXTRAS[module]
        raise ImportError(
            f"{feature} needs {module.split('.')[0]}, which is not installed; install it with "
            f"`pip install 'post3r-slots[{extra}]'` (or `uv add 'post3r-slots[{extra}]'`)."
        ) from error
