"""The RoPE2D entry point and its implementation registry.

Model code calls `rope2d`; which implementation runs is decided here, from the `impl`
argument, else the `POST3R_ROPE2D_IMPL` environment variable, else `"auto"`. New
implementations are added with `register_rope2d_impl`, without touching any caller.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable

import torch

from post3r_kernels.eager import rope2d_eager
from post3r_kernels.reference import rope2d_torch
from post3r_kernels.validation import check_rope2d_inputs

ENV_VAR = "POST3R_ROPE2D_IMPL"
AUTO = "auto"

Rope2dImpl = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
"""An implementation: `fn(x (B, H, N, D), positions (B, N, 2) int, base) -> rotated x`.

It receives arguments that already passed `check_rope2d_inputs`, must not modify `x` and
must be differentiable with respect to `x` if it is to be used in training.
"""

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_REGISTRY: dict[str, Rope2dImpl] = {}


def register_rope2d_impl(name: str, fn: Rope2dImpl, *, overwrite: bool = False) -> None:
    """Make `fn` selectable as `rope2d(..., impl=name)` and `POST3R_ROPE2D_IMPL=name`."""
    if not isinstance(name, str) or not name or name != name.strip() or name == AUTO:
        raise ValueError(
            f"implementation name must be a non-empty string other than 'auto', got {name!r}"
        )
    if not callable(fn):
        raise TypeError(f"implementation {name!r} must be callable, got {type(fn).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(
            f"a rope2d implementation named {name!r} is already registered; "
            "pass overwrite=True to replace it"
        )
    _REGISTRY[name] = fn


def rope2d_impls() -> tuple[str, ...]:
    """Names accepted by `impl=` (registered implementations, then `"auto"`)."""
    return (*_REGISTRY, AUTO)


def _triton_installed() -> bool:
    """Whether the triton package can be imported, checked without importing it."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or half-removed install
        return False


# Decided once at import, so that code traced by torch.compile reads a constant.
TRITON_INSTALLED = _triton_installed()


def auto_impl(x: torch.Tensor) -> str:
    """What `"auto"` picks for `x`: Triton on CUDA/ROCm devices (if installed), else eager."""
    on_gpu = x.device.type == "cuda"  # ROCm builds of torch also report "cuda"
    if on_gpu and x.dtype in TRITON_DTYPES and TRITON_INSTALLED and "triton" in _REGISTRY:
        return "triton"
    return "eager"


def resolve_rope2d_impl(impl: str | None, x: torch.Tensor) -> str:
    """The registered implementation name that `rope2d(x, ..., impl=impl)` would run."""
    source = "impl"
    if impl is None:
        impl, source = os.environ.get(ENV_VAR, "").strip() or AUTO, ENV_VAR
    if not isinstance(impl, str):
        raise TypeError(f"impl must be a string or None, got {type(impl).__name__}")
    if impl == AUTO:
        return auto_impl(x)
    if impl not in _REGISTRY:
        raise ValueError(
            f"unknown rope2d implementation {impl!r} (from {source}); "
            f"expected one of {', '.join(rope2d_impls())}"
        )
    return impl


def rope2d(
    x: torch.Tensor, positions: torch.Tensor, base: float = 100.0, impl: str | None = None
) -> torch.Tensor:
    """Apply 2D rotary position embedding to `x` and return the result as a new tensor.

    Args:
        x: tokens (B, H, N, D), D a multiple of 4, any strides (e.g. `q.transpose(1, 2)` of a
            (B, N, H, D) projection, or a slice of a fused qkv tensor); float16, bfloat16,
            float32 or float64. Half precision is computed in float32 and rounded once.
        positions: (B, N, 2) integer (y, x) per token; negative and non-grid values are fine.
        base: frequency base; dims j and j + D/4 of each half turn by `pos * base**(-4j/D)`.
        impl: implementation name (see `rope2d_impls`); `None` reads `POST3R_ROPE2D_IMPL`
            and falls back to `"auto"`.

    Returns:
        Rotated tokens with x's shape and dtype; differentiable with respect to `x`.
    """
    check_rope2d_inputs(x, positions, base)
    return _REGISTRY[resolve_rope2d_impl(impl, x)](x, positions, float(base))


def _triton_impl(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    if not TRITON_INSTALLED:
        raise RuntimeError(
            "impl='triton' needs the triton package, which is not installed here "
            "(torch's Linux CUDA and ROCm wheels bring it); use impl='torch' or 'auto'"
        )
    from post3r_kernels.triton_rope2d import rope2d_triton  # imports triton: only when used

    return rope2d_triton(x, positions, base)


@functools.cache
def _compiled_reference() -> Rope2dImpl:
    return torch.compile(rope2d_torch)


def _compiled_impl(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    return _compiled_reference()(x, positions, base)


register_rope2d_impl("torch", rope2d_torch)
register_rope2d_impl("triton", _triton_impl)
register_rope2d_impl("compiled", _compiled_impl)
register_rope2d_impl("eager", rope2d_eager)
