"""DPT dense prediction adapter (as in DUSt3R / CUT3R): 4 token layers -> a full-resolution map.

Module names match the original `DPTOutputAdapter_fix` so checkpoint keys map one to one,
including the quirk that `scratch.layer_rn.{0..3}` is a second name for `scratch.layer{1..4}_rn`
(the same convolutions registered twice, so the state dict lists both).

The values are the original's, computed with fewer multiply-adds unless `plain_arithmetic` is
set: projections before upsampling (FeatureFusionBlock), the output head's upsampling folded
into its 3x3 convolutions (`upconv`), Winograd 3x3 convolutions on the CPU (`winograd`).
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from post3r_backbone.upconv import upsampled_conv3x3
from post3r_backbone.winograd import WinogradConv2d


def token_map(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, N, C) row-major tokens -> a (B, C, h, w) view in the channels_last layout, no copy.

    Convolutions follow their input's stride order. `tokens.transpose(1, 2).unflatten(2, grid)`
    has the same strides except for a size-1 batch, where it gets a stride PyTorch does not
    read as channels_last, so every convolution of the adapter then ran in the NCHW layout
    (slower on CPU; figures in the README). Permuting the unflattened tokens keeps the order at
    any batch.
    """
    return tokens.unflatten(1, grid).permute(0, 3, 1, 2)


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = WinogradConv2d(features, features)
        self.conv2 = WinogradConv2d(features, features)

    def forward(self, x: Tensor) -> Tensor:
        # conv1's output is a fresh tensor, so its ReLU can run in place (x must stay intact).
        return x + self.conv2(self.conv1(F.relu(x)).relu_())


def upsample2x(x: Tensor) -> Tensor:
    """x2 bilinear upsampling with align_corners=True, the DPT's (each output a convex mix)."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class FeatureFusionBlock(nn.Module):
    """Adds a refined skip input, refines, upsamples x2 (bilinear, align_corners) and projects.

    The projection is a 1x1 convolution with bias and the upsampling mixes each output pixel
    from input pixels with weights that sum to 1, so the two commute exactly (in real
    arithmetic): projecting first costs a quarter of the multiply-adds. `plain=True` runs the
    original's order (upsample, then project), the reference for tests and the benchmark.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        self.resConfUnit1 = ResidualConvUnit(features)  # unused in refinenet4, as in the original
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(
        self, x: Tensor, skip: Tensor | None = None, *, plain: bool = False, upsample: bool = True
    ) -> Tensor:
        """The fused map; `upsample=False` leaves out the final upsampling (for a consumer that
        upsamples as part of its next convolution)."""
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if plain:
            return self.out_conv(upsample2x(x))
        x = self.out_conv(x)
        return upsample2x(x) if upsample else x


def _scratch(layer_dims: tuple[int, ...], features: int) -> nn.Module:
    scratch = nn.Module()
    convs = [WinogradConv2d(dim, features, bias=False) for dim in layer_dims]
    for index, conv in enumerate(convs, start=1):
        setattr(scratch, f"layer{index}_rn", conv)
    scratch.layer_rn = nn.ModuleList(convs)  # alias names, kept for checkpoint compatibility
    for index in range(1, 5):
        setattr(scratch, f"refinenet{index}", FeatureFusionBlock(features))
    return scratch


class DPTAdapter(nn.Module):
    """Turns 4 token maps (B, N, C_i) on an (H/p, W/p) grid into a (B, channels, H, W) map."""

    def __init__(
        self,
        token_dims: tuple[int, int, int, int],
        channels: int,
        patch_size: int = 16,
        layer_dims: tuple[int, ...] = (96, 192, 384, 768),
        features: int = 256,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.scratch = _scratch(layer_dims, features)
        self.head = nn.Sequential(
            nn.Conv2d(features, features // 2, 3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(features // 2, features // 2, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(features // 2, channels, 1),
        )
        d0, d1, d2, d3 = layer_dims
        # Bring the 4 token maps to strides 4, 8, 16 and 32 of the image (for p = 16).
        self.act_postprocess = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(token_dims[0], d0, 1), nn.ConvTranspose2d(d0, d0, 4, stride=4)
                ),
                nn.Sequential(
                    nn.Conv2d(token_dims[1], d1, 1), nn.ConvTranspose2d(d1, d1, 2, stride=2)
                ),
                nn.Sequential(nn.Conv2d(token_dims[2], d2, 1)),
                nn.Sequential(
                    nn.Conv2d(token_dims[3], d3, 1), nn.Conv2d(d3, d3, 3, stride=2, padding=1)
                ),
            ]
        )
        self.weights_channels_last()
        self.register_load_state_dict_post_hook(_weights_channels_last_after_load)
        self._plain_arithmetic = False

    @property
    def plain_arithmetic(self) -> bool:
        """True: every convolution as the original writes it (the reference for the tests and
        `bench-backbone --compare-heads`); False (default): the same values, fewer multiply-adds
        (projections before upsampling, the output head's upsampling folded into its
        convolutions, Winograd 3x3 convolutions on the CPU)."""
        return self._plain_arithmetic

    @plain_arithmetic.setter
    def plain_arithmetic(self, plain: bool) -> None:
        self._plain_arithmetic = plain
        for module in self.modules():
            if isinstance(module, WinogradConv2d):
                module.winograd = not plain

    token_map = staticmethod(token_map)  # a class attribute so that a benchmark can swap it

    def weights_channels_last(self) -> None:
        """Store the convolution weights channels_last (same values and keys).

        A convolution with a channels_last input otherwise copies its weight into that order on
        every call. Loading with `assign=True` puts plain tensors in; a load hook re-applies it.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                weight = module.weight
                weight.data = weight.data.contiguous(memory_format=torch.channels_last)

    def forward(self, tokens: list[Tensor], image_size: tuple[int, int]) -> Tensor:
        """The (B, channels, H, W) map, channels_last in memory like every map inside."""
        grid = (image_size[0] // self.patch_size, image_size[1] // self.patch_size)
        maps = [self.token_map(t, grid) for t in tokens]
        scratch: Any = self.scratch  # a plain nn.Module holding the original's sub-module names
        maps = [
            rn(post(m))
            for m, post, rn in zip(maps, self.act_postprocess, scratch.layer_rn, strict=True)
        ]
        # The stride-32 branch is rounded up for odd grids; crop it to the stride-16 branch.
        plain = self.plain_arithmetic
        path = scratch.refinenet4(maps[3], plain=plain)
        path = path[:, :, : maps[2].shape[2], : maps[2].shape[3]]
        path = scratch.refinenet3(path, maps[2], plain=plain)
        path = scratch.refinenet2(path, maps[1], plain=plain)
        if plain:
            return self.head(scratch.refinenet1(path, maps[0], plain=True))
        path = scratch.refinenet1(path, maps[0], upsample=False)
        return self.upsampling_head(path)

    def upsampling_head(self, path: Tensor) -> Tensor:
        """`self.head(upsample2x(path))` with both 3x3 convolutions run by `upsampled_conv3x3`
        (each upsampling folded into the convolution after it, half the multiply-adds), the
        ReLU and the 1x1 projection applied per band of output rows."""
        first, second, project = (cast(nn.Conv2d, self.head[i]) for i in (0, 2, 4))
        path = upsampled_conv3x3(path, first.weight, first.bias)

        def relu_and_project(band: Tensor) -> Tensor:  # (B, rows, W, C) channels last
            return F.linear(band.relu_(), project.weight.flatten(1), project.bias)

        return upsampled_conv3x3(path, second.weight, second.bias, relu_and_project)


def _weights_channels_last_after_load(module: DPTAdapter, incompatible_keys: object) -> None:
    module.weights_channels_last()
