"""The DPT adapters' cheaper arithmetic gives the plain convolutions' values, and is used.

Two rewrites, exact in real arithmetic: the fusion blocks project (1x1 convolution) before
upsampling instead of after, and the output head's two 3x3 convolutions fold the x2 upsampling
in front of them into the convolution (`upconv.upsampled_conv3x3`). Checked against the plain
path in float64 (equal to ~1e-15) and float32 (equal to rounding), at odd and even sizes and
batch 1 and 2, and with hooks that fail if the full-resolution convolutions still run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from post3r_backbone import TTT3R, TTT3RConfig
from post3r_backbone.benchmark import plain_heads
from post3r_backbone.dpt import DPTAdapter, FeatureFusionBlock, upsample2x
from post3r_backbone.upconv import height_bands, upsampled_conv3x3

SIZES = [(1, 1), (1, 4), (3, 4), (5, 7), (6, 6), (8, 3)]


def plain_upsampled_conv(x, weight, bias):
    return F.conv2d(upsample2x(x), weight, bias, padding=1)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("band_rows", [1, 3, 16])
def test_upsampled_conv3x3_equals_the_plain_path_in_float64(size, batch, band_rows):
    generator = torch.Generator().manual_seed(sum(size) + batch)
    x = torch.randn(batch, 5, *size, dtype=torch.float64, generator=generator)
    weight = torch.randn(6, 5, 3, 3, dtype=torch.float64, generator=generator)
    bias = torch.randn(6, dtype=torch.float64, generator=generator)
    got = upsampled_conv3x3(x, weight, bias, band_rows=band_rows)
    torch.testing.assert_close(got, plain_upsampled_conv(x, weight, bias), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch", [1, 2])
def test_upsampled_conv3x3_in_float32_with_an_epilogue(batch):
    # A DPT output head's tail at a small odd size: 3x3 -> ReLU -> 1x1, channels_last input.
    torch.manual_seed(batch)
    x = torch.randn(batch, 32, 7, 10).contiguous(memory_format=torch.channels_last)
    second, project = nn.Conv2d(32, 32, 3, padding=1), nn.Conv2d(32, 4, 1)
    with torch.no_grad():
        expected = project(F.relu(second(upsample2x(x))))

        def relu_and_project(band):
            return F.linear(band.relu_(), project.weight.flatten(1), project.bias)

        got = upsampled_conv3x3(x, second.weight, second.bias, relu_and_project)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    # Channels_last with the canonical strides at any batch, like the plain path's output.
    assert got.stride() == expected.stride() == (4 * 14 * 20, 1, 20 * 4, 4)


def test_upsampled_conv3x3_rejects_a_weight_that_is_not_3x3():
    with pytest.raises(ValueError, match=r"weight \(6, 5, 1, 1\) is not \(6, 5, 3, 3\)"):
        upsampled_conv3x3(torch.randn(1, 5, 4, 4), torch.randn(6, 5, 1, 1), None)


def test_height_bands_cover_every_row_once_and_are_cached():
    bands = height_bands(7, 4, torch.device("cpu"), torch.float32)
    assert [(b.start, b.stop) for b in bands] == [(0, 4), (4, 8), (8, 12), (12, 14)]
    assert height_bands(7, 4, torch.device("cpu"), torch.float32) is bands
    # Interior output rows mix two input rows per dy with weights summing to 1; the padding
    # rows (above the first and below the last output row) contribute nothing.
    sums = torch.cat([b.weights.sum(-1) for b in bands], dim=1)  # (3, 14)
    expected = torch.ones(3, 14)
    expected[0, 0] = expected[2, -1] = 0
    torch.testing.assert_close(sums, expected)


@pytest.mark.parametrize("size", [(3, 4), (5, 2)])
@pytest.mark.parametrize("batch", [1, 2])
def test_fusion_block_projects_before_upsampling_with_the_same_values(size, batch):
    torch.manual_seed(0)
    block = FeatureFusionBlock(8).double()
    x, skip = torch.randn(2, batch, 8, *size, dtype=torch.float64)
    inputs = []
    block.out_conv.register_forward_hook(lambda module, args, out: inputs.append(args[0].shape))
    with torch.no_grad():
        plain = block(x, skip, plain=True)
        new = block(x, skip)
        low = block(x, skip, upsample=False)
    torch.testing.assert_close(new, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(upsample2x(low), plain, rtol=1e-12, atol=1e-12)
    # The projection ran at the upsampled size only in the plain path.
    high = (2 * size[0], 2 * size[1])
    assert [tuple(shape[2:]) for shape in inputs] == [high, size, size]


def adapter_and_tokens(batch: int, grid: tuple[int, int]):
    torch.manual_seed(batch)
    adapter = DPTAdapter((24, 16, 16, 16), 4, layer_dims=(8, 16, 24, 32), features=32)
    tokens = [torch.randn(batch, grid[0] * grid[1], dim) for dim in (24, 16, 16, 16)]
    return adapter.eval(), tokens, (grid[0] * 16, grid[1] * 16)


@pytest.mark.parametrize("grid", [(6, 8), (5, 3)])
@pytest.mark.parametrize("batch", [1, 2])
def test_dpt_adapter_output_equals_its_plain_arithmetic(grid, batch):
    adapter, tokens, image_size = adapter_and_tokens(batch, grid)
    with torch.no_grad():
        new = adapter(tokens, image_size)
        adapter.plain_arithmetic = True
        plain = adapter(tokens, image_size)
    assert new.shape == (batch, 4, *image_size)
    assert new.stride() == plain.stride()
    torch.testing.assert_close(new, plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())


def test_the_dpt_head_convolutions_no_longer_run_at_full_resolution():
    # The head's Conv2d modules are only weights to `upsampled_conv3x3` now; if the adapter
    # went back to running them (or projected after upsampling), these hooks would see it.
    adapter, tokens, image_size = adapter_and_tokens(1, (6, 8))
    calls: list[tuple[str, tuple[int, ...]]] = []
    for name, module in adapter.named_modules():
        if name.startswith("head.") or name.endswith("out_conv"):
            module.register_forward_hook(
                lambda module, args, out, name=name: calls.append((name, tuple(args[0].shape)))
            )
    with torch.no_grad():
        adapter(tokens, image_size)
        new, calls[:] = list(calls), []
        adapter.plain_arithmetic = True
        adapter(tokens, image_size)
        plain = list(calls)
    assert not [name for name, _ in new if name.startswith("head.")]
    assert {name for name, _ in plain if name.startswith("head.")} == {
        "head.0",
        "head.1",
        "head.2",
        "head.3",
        "head.4",
    }
    # refinenet1 projects at a quarter of the image size, not after upsampling to half of it.
    projections = dict(new)
    assert projections["scratch.refinenet1.out_conv"][2:] == (24, 32)
    assert dict(plain)["scratch.refinenet1.out_conv"][2:] == (48, 64)


def test_plain_heads_gives_the_same_model_outputs_and_is_restored():
    torch.manual_seed(0)
    model = TTT3R(TTT3RConfig.preset("tiny")).freeze()
    frame = torch.rand(1, 3, 48, 64)
    names = ("pts3d_world", "conf_world", "pts3d_self", "conf_self", "rgb")
    with torch.inference_mode():
        new, _ = model.step(frame, model.init_state(1), outputs=names)
        with plain_heads(model):
            plain, _ = model.step(frame, model.init_state(1), outputs=names)
    for name in names:
        torch.testing.assert_close(getattr(new, name), getattr(plain, name), rtol=1e-5, atol=1e-5)
    adapters = [m for m in model.modules() if isinstance(m, DPTAdapter)]
    assert len(adapters) == 3
    assert not any(adapter.plain_arithmetic for adapter in adapters)
