"""The heads' convolutions run in the channels_last layout, at batch 1 and batch > 1.

PyTorch picks a convolution's memory format from its input's strides, and a size-1 batch
dimension with an odd stride is enough to make it fall back to the (slower on CPU) NCHW layout,
even though `is_contiguous(memory_format=torch.channels_last)` is True for such an input (size-1
dimensions are ignored there). The checks below therefore look at the layout a convolution
actually produced (its output must be channels_last-contiguous with the canonical strides of its
shape) and at its input's stride order, including size-1 dimensions.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from post3r_backbone import TTT3R, TTT3RConfig, winograd
from post3r_backbone.benchmark import plain_heads, previous_layout
from post3r_backbone.dpt import DPTAdapter, token_map
from post3r_backbone.layers import PatchEmbed

PATCH_TOKENS = PatchEmbed.forward

CONVOLUTIONS = (nn.Conv2d, nn.ConvTranspose2d)


def canonical_channels_last_strides(shape: torch.Size) -> tuple[int, ...]:
    return torch.empty(shape, device="meta", memory_format=torch.channels_last).stride()


def strides_like_channels_last(x: torch.Tensor) -> bool:
    """Strides ordered C fastest, then W, H, N, counting size-1 dimensions too.

    This is PyTorch's rule for suggesting the channels_last format (c10's
    `is_channels_last_strides_2d`), which is what a convolution follows.
    """
    smallest = 0
    for dim in (1, 3, 2, 0):
        if x.stride(dim) < smallest or (dim == 0 and smallest == x.stride(1)):
            return False
        smallest = x.stride(dim) * max(x.shape[dim], 1) if x.shape[dim] > 1 else x.stride(dim)
    return True


def record_layouts(model: nn.Module) -> tuple[list[str], list]:
    """Hooks on every convolution of the heads; returns (names seen, hook handles)."""
    seen: list[str] = []
    handles = []
    for name, module in model.downstream_head.named_modules():
        if not isinstance(module, CONVOLUTIONS):
            continue

        def check(module, inputs, output, name=name):
            (x,) = inputs
            assert strides_like_channels_last(x), (
                f"{name} got input strides {x.stride()} for shape {tuple(x.shape)}"
            )
            assert output.stride() == canonical_channels_last_strides(output.shape), (
                f"{name} ran in the NCHW layout: output strides {output.stride()}"
            )
            seen.append(name)

        handles.append(module.register_forward_hook(check))
    return seen, handles


@pytest.mark.parametrize("arithmetic", ["new", "plain"])
@pytest.mark.parametrize("batch", [1, 2])
def test_dpt_head_convolutions_run_channels_last(batch, arithmetic, monkeypatch):
    monkeypatch.setattr(winograd, "MIN_PIXELS", 1)  # Winograd's outputs too, at this small size
    torch.manual_seed(0)
    model = TTT3R(TTT3RConfig.preset("tiny")).freeze()
    seen, handles = record_layouts(model)
    frame = torch.rand(batch, 3, 48, 64)
    with torch.inference_mode(), plain_heads(model) if arithmetic == "plain" else nullcontext():
        out, _ = model.step(frame, model.init_state(batch), outputs="all")
    for handle in handles:
        handle.remove()
    convolutions = [
        n for n, m in model.downstream_head.named_modules() if isinstance(m, CONVOLUTIONS)
    ]
    # Every convolution module of the three adapters ran (refinenet4's resConfUnit1 is unused,
    # as in the original; named_modules lists the aliased scratch.layer_rn.* convolutions
    # once), except, with the new arithmetic, the output heads' (their weights are used by
    # `upsampled_conv3x3`, whose own convolutions the next test checks).
    expected = {n for n in convolutions if "refinenet4.resConfUnit1" not in n}
    if arithmetic == "new":
        expected = {n for n in expected if ".head." not in n}
    assert set(seen) == expected
    assert len(seen) == len(set(seen))  # each ran once
    assert out.pts3d_world.shape == (batch, 48, 64, 3)


@pytest.mark.parametrize("batch", [1, 2])
def test_every_convolution_call_of_the_heads_runs_channels_last(batch, monkeypatch):
    # Includes the convolutions `upsampled_conv3x3` calls directly (no module to hook).
    conv2d = F.conv2d
    calls = []
    in_heads = []

    def checked_conv2d(x, weight, *args, **kwargs):
        out = conv2d(x, weight, *args, **kwargs)
        if in_heads:  # not the encoder's patch embedding
            assert strides_like_channels_last(x), f"input strides {x.stride()}, {tuple(x.shape)}"
            assert out.stride() == canonical_channels_last_strides(out.shape), out.stride()
            calls.append(tuple(weight.shape))
        return out

    torch.manual_seed(0)
    model = TTT3R(TTT3RConfig.preset("tiny")).freeze()
    model.downstream_head.register_forward_pre_hook(lambda *_: in_heads.append(True))
    model.downstream_head.register_forward_hook(lambda *_: in_heads.clear())
    monkeypatch.setattr(F, "conv2d", checked_conv2d)
    with torch.inference_mode():
        model.step(torch.rand(batch, 3, 48, 64), model.init_state(batch), outputs="all")
    features = model.config.dpt_feature_dim
    assert calls.count((features // 2, features, 1, 3)) == 3 * 3  # 3 adapters x 3 kernel rows


def test_the_stride_rule_catches_the_batch_one_trap():
    # The layout the heads used to build: is_contiguous(channels_last) cannot tell it apart.
    tokens = torch.randn(1, 12, 8)
    old = tokens.transpose(1, 2).unflatten(2, (3, 4))
    new = tokens.unflatten(1, (3, 4)).permute(0, 3, 1, 2)
    assert old.is_contiguous(memory_format=torch.channels_last)
    assert not strides_like_channels_last(old)
    assert strides_like_channels_last(new)
    conv = nn.Conv2d(8, 8, 1)
    assert conv(old).stride() != canonical_channels_last_strides(conv(old).shape)
    assert conv(new).stride() == canonical_channels_last_strides(conv(new).shape)


def test_dpt_convolution_weights_stay_channels_last_after_loading():
    # Stored channels_last so that no convolution copies its weight on every call; a load with
    # assign=True (how checkpoints are loaded) puts plain tensors in, which a hook converts back.
    model = TTT3R(TTT3RConfig.preset("tiny"))
    plain = {key: value.contiguous() for key, value in model.state_dict().items()}
    model.load_state_dict(plain, assign=True)
    weights = [
        (name, module.weight)
        for name, module in model.downstream_head.named_modules()
        if isinstance(module, nn.Conv2d)
    ]
    assert weights
    assert not plain["downstream_head.dpt_self.head.0.weight"].is_contiguous(
        memory_format=torch.channels_last
    )
    for name, weight in weights:  # what a convolution checks before copying its weight
        assert weight.is_contiguous(memory_format=torch.channels_last), name
    for key, value in model.state_dict().items():  # same values under the same keys
        assert torch.equal(value, plain[key]), key


LINEAR_TINY = {"head_type": "linear", "patch_size": 8}


@pytest.mark.parametrize("overrides", [{}, LINEAR_TINY], ids=["dpt", "linear"])
@pytest.mark.parametrize("batch", [1, 2])
def test_the_previous_layout_gives_the_same_outputs_and_is_restored(overrides, batch):
    # The layout is the only difference, so the outputs match bit for bit; the benchmark's
    # context puts everything back afterwards.
    torch.manual_seed(0)
    model = TTT3R(TTT3RConfig.preset("tiny", **overrides)).freeze()
    frame = torch.rand(batch, 3, 48, 64)
    names = ("pts3d_world", "conf_world", "pts3d_self", "conf_self", "rgb", "camera_pose")
    with torch.inference_mode():
        new, _ = model.step(frame, model.init_state(batch), outputs=names)
        with previous_layout(model):
            old, _ = model.step(frame, model.init_state(batch), outputs=names)
        again, _ = model.step(frame, model.init_state(batch), outputs=names)
    for name in names:
        torch.testing.assert_close(getattr(new, name), getattr(old, name), rtol=1e-6, atol=1e-6)
        assert torch.equal(getattr(new, name), getattr(again, name)), name
    assert DPTAdapter.token_map is token_map
    assert PatchEmbed.forward is PATCH_TOKENS
    for module in model.downstream_head.modules():
        if isinstance(module, nn.Conv2d):
            assert module.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("batch", [1, 2])
def test_the_encoders_residual_stream_is_contiguous(batch):
    """Patch tokens, and so every encoder block's sums and LayerNorms, in row-major order: a
    transposed stream (the patch embedding's plain `flatten(2).transpose(1, 2)`) is what
    every elementwise op downstream would follow."""
    torch.manual_seed(0)
    model = TTT3R(TTT3RConfig.preset("tiny")).freeze()
    image = torch.rand(batch, 3, 48, 64) * 2 - 1
    streams: list[torch.Tensor] = []
    for block in model.enc_blocks:
        block.register_forward_hook(lambda module, args, out: streams.append(out))
    with torch.inference_mode():
        tokens, _ = model.encode_image(image)
        assert model.patch_embed(image).is_contiguous()
        with previous_layout(model):
            assert not model.patch_embed(image).is_contiguous()  # the trap the fix avoids
            old, _ = model.encode_image(image)
    assert streams and all(x.is_contiguous() for x in streams[: len(model.enc_blocks)])
    assert torch.equal(tokens, old)  # the layout changes no value
