"""The DPT adapters' cheaper arithmetic gives the plain convolutions' values, and is used.

The fusion blocks project (1x1 convolution) before upsampling instead of after, exact in real
arithmetic. Checked against the plain path in float64 (equal to ~1e-15) and float32 (equal to
rounding), at odd and even sizes and batch 1 and 2.
"""

from __future__ import annotations

import pytest
import torch

from post3r_backbone import TTT3R, TTT3RConfig
from post3r_backbone.benchmark import plain_heads
from post3r_backbone.dpt import DPTAdapter, FeatureFusionBlock, upsample2x


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
