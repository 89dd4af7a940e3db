"""Readable PyTorch reference of 2D RoPE ("RoPE100" of CroCo/DUSt3R/CUT3R); the oracle for kernels.

For head dim D with Q = D // 4: dims [0, D/2) rotate by the row (y) position and [D/2, D) by the
column (x) position; inside each half, dim j pairs with dim j + Q (rotate-half layout) and turns by
angle `pos * base ** (-j / Q)`. Angles come straight from integer positions, so negative
(the pose token sits at (-1, -1)) and arbitrary positions work.

Half-precision inputs are computed in float32 and rounded once on output, like the CUDA kernel
of the original code; float64 inputs are computed in float64 (for gradcheck).
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype RoPE math runs in for tokens of `dtype`: float64 stays, the rest use float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def inverse_frequencies(
    quarter: int, base: float, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """`base ** (-j / quarter)` for j in [0, quarter), computed as the original code does."""
    j = torch.arange(quarter, device=device, dtype=dtype)
    return 1.0 / (base ** (j / quarter))


def rotation_angles(
    positions: torch.Tensor, quarter: int, base: float, dtype: torch.dtype
) -> torch.Tensor:
    """(B, 1, N, 2, Q) angles, one per token, axis (y then x) and frequency."""
    inv_freq = inverse_frequencies(quarter, base, positions.device, dtype)
    return positions.to(dtype)[:, None, :, :, None] * inv_freq


def rope2d_torch(x: torch.Tensor, positions: torch.Tensor, base: float = 100.0) -> torch.Tensor:
    """Rotate `x` (B, H, N, D) by integer `positions` (B, N, 2) = (y, x); returns a new tensor.

    Any strides are accepted. The result has x's dtype; gradients flow to `x` through autograd
    (they equal the inverse rotation of the incoming gradient).
    """
    quarter = x.shape[-1] // 4
    math_dtype = compute_dtype(x.dtype)
    angles = rotation_angles(positions, quarter, base, math_dtype)
    cos, sin = angles.cos(), angles.sin()
    halves = x.to(math_dtype).unflatten(-1, (2, 2, quarter))  # (B, H, N, axis, pair half, Q)
    u, v = halves[..., 0, :], halves[..., 1, :]
    rotated = torch.stack((u * cos - v * sin, v * cos + u * sin), dim=-2)
    return rotated.flatten(-3).to(x.dtype)
