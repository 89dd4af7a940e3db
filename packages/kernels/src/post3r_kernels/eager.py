"""RoPE2D in eager PyTorch with few passes over the tokens, the CPU's default implementation.

The reference (`rope2d_torch`) is written for reading: four products of half-width slices, a
difference, a sum and a stack, about ten passes over token-sized memory, most with 16-wide inner
loops. Here the rotation is `x * cos + swap(x) * sin` over whole rows: `swap` exchanges the two
halves of each axis's pair (one copy), and the cos and sin rows (sin negated on the first half of
each pair) are built once per call for the N positions, so four passes remain (`swap`, two
products, a sum, the last two in place), each over contiguous rows of D. Per element it is the
reference's arithmetic, two rounded products and a rounded sum (negating sin is exact), so the
results are the reference's bit for bit. In the TTT3R backbone on the CPU it saves about 2-4 %
of a frame's CPU time (`bench-backbone`). Autograd differentiates it like any composition of
torch ops (the in-place steps act on fresh tensors).
"""

from __future__ import annotations

import torch

from post3r_kernels.reference import compute_dtype, rotation_angles


def rotation_rows(
    positions: torch.Tensor, base: float, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, N, D) cos and signed sin rows: dims j and j + Q of each axis's half turn together,
    the first of the pair by `u cos - v sin`, the second by `v cos + u sin`."""
    angles = rotation_angles(positions, head_dim // 4, base, dtype)  # (B, 1, N, axis, Q)
    cos, sin = angles.cos(), angles.sin()
    cos_rows = torch.stack((cos, cos), dim=-2).flatten(-3)  # (B, 1, N, axis * pair * Q)
    sin_rows = torch.stack((-sin, sin), dim=-2).flatten(-3)
    return cos_rows, sin_rows


def rope2d_eager(x: torch.Tensor, positions: torch.Tensor, base: float = 100.0) -> torch.Tensor:
    """Rotate `x` (B, H, N, D) by integer `positions` (B, N, 2); same contract as `rope2d_torch`."""
    math_dtype = compute_dtype(x.dtype)
    # Mixed-dtype products are several times slower than one cast followed by same-dtype ones.
    tokens = x.to(math_dtype)
    cos_rows, sin_rows = rotation_rows(positions, base, x.shape[-1], math_dtype)
    quarter = x.shape[-1] // 4
    swapped = tokens.unflatten(-1, (2, 2, quarter)).flip(-2).flatten(-3)  # (v, u) per pair
    # Two rounded products and a rounded sum, as the reference: `addcmul_` would fuse them into
    # one multiply-add and move results by a last bit, and with them every figure measured
    # with the reference (training runs included).
    rotated = torch.mul(tokens, cos_rows)
    rotated.add_(swapped.mul_(sin_rows))
    return rotated.to(x.dtype)
