"""Readable PyTorch reference of 2D RoPE ("RoPE100" of CroCo/DUSt3R/CUT3R); the oracle for kernels.

For head dim D with Q = D // 4: dims [0, D/2) rotate by the row (y) position and [D/2, D) by the
column (x) position; inside each half, dim j pairs with dim j + Q (rotate-half layout) and turns by
angle ``pos * base ** (-j / Q)``. Angles come straight from integer positions, so negative
(the pose token sits at (-1, -1)) and arbitrary positions work.
"""

from __future__ import annotations

import torch


def inverse_frequencies(quarter: int, base: float, device: torch.device) -> torch.Tensor:
    """``base ** (-j / quarter)`` for j in [0, quarter), in float32 (what the CUDA kernel uses)."""
    j = torch.arange(quarter, device=device, dtype=torch.float32)
    return 1.0 / (base ** (j / quarter))


def rope2d_torch(x: torch.Tensor, positions: torch.Tensor, base: float = 100.0) -> torch.Tensor:
    """Rotate ``x`` (B, H, N, D) by ``positions`` (B, N, 2) = (y, x); float32 math, x's dtype out."""
    quarter = x.shape[-1] // 4
    inv_freq = inverse_frequencies(quarter, base, x.device)
    # (B, 1, N, 2, Q): one angle per token, axis (y then x) and frequency.
    angles = positions.to(torch.float32)[:, None, :, :, None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    halves = x.float().unflatten(-1, (2, 2, quarter))  # (B, H, N, axis, pair half, Q)
    u, v = halves[..., 0, :], halves[..., 1, :]
    rotated = torch.stack((u * cos - v * sin, v * cos + u * sin), dim=-2)
    return rotated.flatten(-3).to(x.dtype)
