"""Argument checks shared by every RoPE2D implementation, with errors that say what was expected."""

from __future__ import annotations

import math

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTEGER_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def check_rope2d_inputs(x: object, positions: object, base: object) -> None:
    """Raise TypeError / ValueError unless `rope2d(x, positions, base)` is well formed."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (B, H, N, D), got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"x must have shape (B, H, N, D), got {tuple(x.shape)} ({x.ndim} dims)")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"x must be float16, bfloat16, float32 or float64, got {x.dtype}; "
            "cast the tokens before RoPE"
        )
    head_dim = x.shape[-1]
    if head_dim == 0 or head_dim % 4:
        raise ValueError(
            f"x: head dim D={head_dim} must be a positive multiple of 4 "
            "(two axes, each rotating pairs of dims)"
        )

    if not isinstance(positions, torch.Tensor):
        raise TypeError(
            f"positions must be an integer torch.Tensor of shape (B, N, 2), "
            f"got {type(positions).__name__}"
        )
    if positions.dtype not in _INTEGER_DTYPES:
        raise TypeError(
            f"positions must be an integer tensor (int32 or int64) of (y, x) grid coordinates, "
            f"got {positions.dtype}; convert with positions.long() if the values are integral"
        )
    batch, _, tokens, _ = x.shape
    if tuple(positions.shape) != (batch, tokens, 2):
        raise ValueError(
            f"positions must have shape (B, N, 2) = ({batch}, {tokens}, 2) to match x of shape "
            f"(B, H, N, D) = {tuple(x.shape)}, got {tuple(positions.shape)}"
        )
    if positions.device != x.device:
        raise ValueError(
            f"positions is on {positions.device} but x is on {x.device}; "
            "move both to the same device"
        )

    if isinstance(base, bool) or not isinstance(base, int | float):
        raise TypeError(f"base must be a real number, got {type(base).__name__}")
    if not math.isfinite(base) or base <= 0:
        raise ValueError(f"base must be a finite positive number (100 for RoPE100), got {base}")
