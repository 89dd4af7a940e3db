"""Token layout helpers around RoPE2D attention: heads split and merged, (y, x) grid positions.

Both the TTT3R backbone and the slot decoder lay tokens out the same way: projections are
(B, N, H * D) with the heads contiguous in the channel dim, attention and `rope2d` take
(B, H, N, D) views of them, and a token's RoPE position is its (row, column) on a row-major grid.
"""

from __future__ import annotations

import torch


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H * D) -> (B, H, N, D), a view (no copy); `heads` must divide the last dim."""
    if x.shape[-1] % heads:
        raise ValueError(
            f"cannot split {x.shape[-1]} channels into {heads} heads: the channel count must be "
            "a multiple of the number of heads"
        )
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (B, N, H * D), the inverse of `split_heads` (copies unless it is a view
    of a (B, N, H, D) tensor)."""
    return x.transpose(1, 2).flatten(2)


def row_major_positions(
    count: int, width: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """(count, 2) int64 (row, col) of the first `count` cells of a row-major grid `width` wide.

    Token i sits at (i // width, i % width); the last row may be partly filled.
    """
    if count < 0 or width < 1:
        raise ValueError(f"need count >= 0 and width >= 1, got count={count}, width={width}")
    index = torch.arange(count, device=device)
    return torch.stack((index // width, index % width), dim=-1)


def grid_positions(
    height: int, width: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """(height * width, 2) int64 (row, col) positions of a full row-major grid of patches."""
    if height < 0:
        raise ValueError(f"need height >= 0, got {height}")
    return row_major_positions(height * width, width, device)
