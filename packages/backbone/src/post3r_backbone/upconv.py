"""A 3x3 convolution of a x2 bilinear-upsampled map, with half of its channel mixing saved.

`conv3x3(upsample2x(x))` (padding 1, bilinear with `align_corners=True`), as the DPT adapters'
output heads compute it, mixes channels at every pixel of the upsampled map. The upsampling is
separable (along the width, then along the height) and acts on each channel alone, so it
commutes with channel mixing and with shifts along the other axis. Writing the convolution as
its three kernel rows dy, `conv3x3(u) = sum over dy of shift_dy(conv1x3_dy(u))`:

    conv3x3(up_h(up_w(x))) = bias + sum over dy of shift_dy(up_h(conv1x3_dy(up_w(x))))

where `shift_dy` moves the map by dy - 1 rows with zeros coming in (the convolution's padding).
The three 1x3 convolutions run at half the output's rows: half the multiply-adds. What is left
at full resolution is the height interpolation with its shifts, a linear map along the rows: per
band of output rows, a small matrix (two non-zero weights per output row and dy) times the few
input rows the band reads, one matrix product per dy. An `epilogue` (e.g. ReLU and a 1x1
convolution) runs per band, so the full-resolution map of the 3x3 convolution itself is never
stored. Equal to the plain path up to float32 rounding (the sums run in another order).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

# Output rows per band: on a CPU few enough for a band's inputs and outputs to stay in cache;
# elsewhere (a GPU) more, for fewer kernel launches.
CPU_BAND_ROWS = 16
DEVICE_BAND_ROWS = 64


@dataclass(frozen=True)
class Band:
    """Output rows [start, stop) read input rows [first, last) of each 1x3 convolution's map;
    `weights` (3, stop - start, last - first) are the shifted height interpolations per dy."""

    start: int
    stop: int
    first: int
    last: int
    weights: Tensor


def _height_taps(n_in: int, row: int) -> list[tuple[int, float]]:
    """(input row, weight) pairs of the x2 upsampling (align_corners=True) at output `row`;
    none outside the upsampled map (the convolution's zero padding)."""
    n_out = 2 * n_in
    if not 0 <= row < n_out:
        return []
    source = row * ((n_in - 1) / (n_out - 1))
    low = min(math.floor(source), n_in - 1)
    fraction = source - low
    return [(low, 1.0 - fraction), (min(low + 1, n_in - 1), fraction)]


@lru_cache(maxsize=64)
def height_bands(
    n_in: int, band_rows: int, device: torch.device, dtype: torch.dtype
) -> tuple[Band, ...]:
    """The bands covering the 2 n_in output rows, with their weights (cached per size)."""
    # Built as normal tensors even under inference mode: a cached inference tensor would make
    # a later forward that needs gradients fail ("Inference tensors cannot be saved").
    with torch.inference_mode(False):
        return _height_bands(n_in, band_rows, device, dtype)


def _height_bands(
    n_in: int, band_rows: int, device: torch.device, dtype: torch.dtype
) -> tuple[Band, ...]:
    bands = []
    for start in range(0, 2 * n_in, band_rows):
        stop = min(start + band_rows, 2 * n_in)
        taps = [[_height_taps(n_in, row + dy - 1) for row in range(start, stop)] for dy in range(3)]
        read = [index for per_dy in taps for per_row in per_dy for index, _ in per_row]
        first, last = min(read), max(read) + 1
        weights = torch.zeros(3, stop - start, last - first, dtype=torch.float64)
        for dy, per_dy in enumerate(taps):
            for offset, per_row in enumerate(per_dy):
                for index, weight in per_row:
                    weights[dy, offset, index - first] += weight
        bands.append(Band(start, stop, first, last, weights.to(device=device, dtype=dtype)))
    return tuple(bands)


def upsampled_conv3x3(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    epilogue: Callable[[Tensor], Tensor] | None = None,
    band_rows: int | None = None,
) -> Tensor:
    """`epilogue(conv3x3(upsample2x(x)))` for x (B, C, h, w): a (B, C', 2h, 2w) channels_last map.

    `weight` (C_out, C, 3, 3) and `bias` (C_out,) are the convolution's (stride 1, padding 1);
    `epilogue` maps a band (B, rows, 2w, C_out), channels last, to (B, rows, 2w, C'); without
    one, C' = C_out. `band_rows`: output rows per band (default: by device).
    """
    batch, channels, height, width = x.shape
    out_channels = weight.shape[0]
    if weight.shape != (out_channels, channels, 3, 3):
        raise ValueError(f"weight {tuple(weight.shape)} is not ({out_channels}, {channels}, 3, 3)")
    if band_rows is None:
        band_rows = CPU_BAND_ROWS if x.device.type == "cpu" else DEVICE_BAND_ROWS
    wide = F.interpolate(x, size=(height, 2 * width), mode="bilinear", align_corners=True)
    # Per kernel row dy: (B, h, 2w * C_out), the pixels of each row contiguous, channels last.
    rows = [
        F.conv2d(wide, weight[:, :, dy : dy + 1].contiguous(), padding=(0, 1))
        .permute(0, 2, 3, 1)
        .reshape(batch, height, -1)
        for dy in range(3)
    ]
    del wide
    out: Tensor | None = None
    for band in height_bands(height, band_rows, x.device, x.dtype):
        mixed = None
        for dy, per_dy in enumerate(rows):
            inputs = per_dy[:, band.first : band.last]
            step = band.weights[dy].expand(batch, -1, -1)
            mixed = torch.bmm(step, inputs) if mixed is None else mixed.baddbmm_(step, inputs)
        assert mixed is not None
        pixels = mixed.unflatten(-1, (2 * width, out_channels))
        if bias is not None:
            pixels += bias
        if epilogue is not None:
            pixels = epilogue(pixels)
        if out is None:
            out = pixels.new_empty(batch, 2 * height, 2 * width, pixels.shape[-1])
        out[:, band.start : band.stop] = pixels
    assert out is not None
    return out.permute(0, 3, 1, 2)
