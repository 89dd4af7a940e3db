"""split_heads / merge_heads and the grid-position helpers: values, views, inverses, errors."""

from __future__ import annotations

import pytest
import torch

from post3r_kernels import grid_positions, merge_heads, rope2d, row_major_positions, split_heads


def test_split_heads_is_a_view_with_head_h_at_channels_h_times_d():
    x = torch.arange(2 * 5 * 12, dtype=torch.float32).reshape(2, 5, 12)
    heads = split_heads(x, 3)
    assert heads.shape == (2, 3, 5, 4)
    assert heads.data_ptr() == x.data_ptr()  # no copy
    for h in range(3):
        torch.testing.assert_close(heads[:, h], x[..., 4 * h : 4 * (h + 1)], rtol=0, atol=0)


def test_merge_heads_inverts_split_heads():
    x = torch.randn(2, 7, 24)
    assert torch.equal(merge_heads(split_heads(x, 4)), x)
    y = torch.randn(2, 4, 7, 6)
    assert torch.equal(split_heads(merge_heads(y), 4), y)


def test_split_heads_refuses_channels_not_divisible_by_heads():
    with pytest.raises(ValueError, match="cannot split 10 channels into 4 heads"):
        split_heads(torch.randn(1, 3, 10), 4)


def test_grid_positions_are_row_major_row_col():
    assert grid_positions(2, 3).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert grid_positions(2, 3).dtype == torch.int64
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(5), indexing="ij")
    assert torch.equal(grid_positions(4, 5), torch.stack((rows.flatten(), cols.flatten()), -1))
    assert grid_positions(0, 3).shape == (0, 2)


def test_row_major_positions_fill_the_last_row_partly():
    assert row_major_positions(5, 2).tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [2, 0]]
    assert torch.equal(row_major_positions(12, 4), grid_positions(3, 4))


@pytest.mark.parametrize(("count", "width"), [(-1, 2), (3, 0)])
def test_row_major_positions_refuse_bad_sizes(count, width):
    with pytest.raises(ValueError, match="need count >= 0 and width >= 1"):
        row_major_positions(count, width)


def test_the_helpers_compose_with_rope2d():
    # Rotating split heads by grid positions and merging back equals rotating each head alone.
    x = torch.randn(2, 6, 3 * 8)
    positions = grid_positions(2, 3).expand(2, -1, -1)
    rotated = merge_heads(rope2d(split_heads(x, 3), positions, impl="torch"))
    for h in range(3):
        one = x[..., None, 8 * h : 8 * (h + 1)].transpose(1, 2)  # (B, 1, N, 8)
        expected = rope2d(one, positions, impl="torch")[:, 0]
        torch.testing.assert_close(rotated[..., 8 * h : 8 * (h + 1)], expected)
