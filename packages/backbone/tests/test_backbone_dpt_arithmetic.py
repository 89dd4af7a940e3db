"""The DPT adapters' cheaper arithmetic gives the plain convolutions' values, and is used.

Three rewrites, exact in real arithmetic: the fusion blocks project (1x1 convolution) before
upsampling instead of after, the output head's two 3x3 convolutions fold the x2 upsampling in
front of them into the convolution (`upconv.upsampled_conv3x3`), and the other stride-1 3x3
convolutions run Winograd F(4x4, 3x3) on the CPU (`winograd.WinogradConv2d`). Checked against
the plain path in float64 (equal to ~1e-12) and float32 (equal to rounding), at odd and even
sizes and batch 1 and 2, and with hooks and counters that fail if a rewrite is not used.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from post3r_backbone import TTT3R, TTT3RConfig, winograd
from post3r_backbone.benchmark import plain_heads
from post3r_backbone.dpt import DPTAdapter, FeatureFusionBlock, upsample2x
from post3r_backbone.upconv import height_bands, upsampled_conv3x3
from post3r_backbone.winograd import (
    POINTS,
    WinogradConv2d,
    toom_cook_matrices,
    transform_weight,
    winograd_conv3x3,
)

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


def test_toom_cook_matrices_give_the_correlation_exactly():
    output, weight, inputs = toom_cook_matrices(POINTS)
    generator = torch.Generator().manual_seed(0)
    tile = torch.randn(6, dtype=torch.float64, generator=generator)
    kernel = torch.randn(3, dtype=torch.float64, generator=generator)
    expected = torch.stack([tile[i : i + 3] @ kernel for i in range(4)])
    got = output @ ((weight @ kernel) * (inputs @ tile))
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("size", [(1, 1), (4, 4), (5, 7), (8, 12), (13, 6)])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("band_tiles", [1, 0])
@pytest.mark.parametrize("with_bias", [True, False])
def test_winograd_conv3x3_equals_the_convolution_in_float64(size, batch, band_tiles, with_bias):
    generator = torch.Generator().manual_seed(sum(size) + batch)
    x = torch.randn(batch, 5, *size, dtype=torch.float64, generator=generator)
    weight = torch.randn(7, 5, 3, 3, dtype=torch.float64, generator=generator)
    bias = torch.randn(7, dtype=torch.float64, generator=generator) if with_bias else None
    got = winograd_conv3x3(x, transform_weight(weight), bias, band_tiles)
    expected = F.conv2d(x, weight, bias, padding=1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert got.stride() == torch.empty_like(expected, memory_format=torch.channels_last).stride()


def test_winograd_rounding_in_float32_stays_near_the_direct_convolutions():
    # About 2x the direct convolution's error (relative to the largest output), 5e-6 at most.
    torch.manual_seed(0)
    x = torch.randn(1, 128, 40, 44).contiguous(memory_format=torch.channels_last)
    conv = WinogradConv2d(128, 128)
    with torch.no_grad():
        exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
        scale = exact.abs().max()
        direct = (F.conv2d(x, conv.weight, conv.bias, padding=1) - exact).abs().max() / scale
        winograd = (conv(x) - exact).abs().max() / scale
    assert winograd <= max(3 * direct, 1e-6)
    assert winograd <= 5e-6


def count_winograd_calls(monkeypatch) -> list[tuple[int, ...]]:
    calls: list[tuple[int, ...]] = []

    def counted(x, transformed, bias, band_tiles=0):
        calls.append(tuple(x.shape))
        return winograd_conv3x3(x, transformed, bias, band_tiles)

    monkeypatch.setattr(winograd, "winograd_conv3x3", counted)
    return calls


def test_winograd_conv2d_runs_winograd_only_where_it_pays_and_no_gradient_is_needed(monkeypatch):
    calls = count_winograd_calls(monkeypatch)
    conv = WinogradConv2d(4, 4)
    large, small = torch.randn(1, 4, 32, 32), torch.randn(1, 4, 31, 32)
    with torch.no_grad():
        conv(large)
        conv(small)  # below MIN_PIXELS
        conv.winograd = False
        conv(large)
    assert calls == [(1, 4, 32, 32)]
    conv.winograd = True
    conv(large)  # the weight needs a gradient: the direct convolution (autograd)
    assert len(calls) == 1


def test_winograd_conv2d_recomputes_its_transformed_weight_when_the_weight_changes():
    torch.manual_seed(0)
    conv = WinogradConv2d(4, 6).requires_grad_(False)
    x = torch.randn(2, 4, 32, 36)
    first = conv.transformed_weight()
    assert conv.transformed_weight() is first  # cached
    state = {key: torch.randn_like(value) for key, value in conv.state_dict().items()}
    conv.load_state_dict(state)  # copied in place
    torch.testing.assert_close(
        conv(x), F.conv2d(x, state["weight"], state["bias"], padding=1), rtol=1e-4, atol=1e-4
    )
    replaced = {key: torch.randn_like(value) for key, value in state.items()}
    conv.load_state_dict(replaced, assign=True)  # new tensors
    torch.testing.assert_close(
        conv(x), F.conv2d(x, replaced["weight"], replaced["bias"], padding=1), rtol=1e-4, atol=1e-4
    )


def test_winograd_conv2d_drops_its_cache_when_moved_or_cast():
    conv = WinogradConv2d(4, 6).requires_grad_(False)
    x = torch.randn(1, 4, 32, 32, dtype=torch.float64)
    conv(x.float())
    assert conv._cached is not None
    conv.double()
    assert conv._cached is None
    torch.testing.assert_close(
        conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("batch", [1, 2])
def test_dpt_adapter_with_winograd_everywhere_equals_its_plain_arithmetic(batch, monkeypatch):
    # The tiny maps here are below MIN_PIXELS; lowering it runs every WinogradConv2d that way.
    monkeypatch.setattr(winograd, "MIN_PIXELS", 1)
    calls = count_winograd_calls(monkeypatch)
    adapter, tokens, image_size = adapter_and_tokens(batch, (5, 3))
    with torch.no_grad():
        new = adapter(tokens, image_size)
        # refinenet1-4 with two units of two convolutions (refinenet4's first unit unused) and
        # the four scratch.layer*_rn projections.
        assert len(calls) == 4 * 2 * 2 - 2 + 4
        adapter.plain_arithmetic = True
        plain = adapter(tokens, image_size)
    assert len(calls) == 4 * 2 * 2 - 2 + 4  # none with the plain arithmetic
    torch.testing.assert_close(new, plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())


def test_tables_cached_under_inference_mode_serve_a_later_backward():
    """A first forward under inference_mode caches the head's row tables; a later forward that
    needs gradients must still run (inference tensors cannot be saved for backward)."""
    from post3r_backbone.upconv import height_bands, upsampled_conv3x3

    height_bands.cache_clear()
    x = torch.randn(1, 4, 5, 6)
    weight = torch.randn(3, 4, 3, 3)
    with torch.inference_mode():
        upsampled_conv3x3(x, weight, None)
    x.requires_grad_(True)
    weight.requires_grad_(True)
    upsampled_conv3x3(x, weight, None).sum().backward()
    assert x.grad is not None and weight.grad is not None
