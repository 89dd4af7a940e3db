"""Winograd F(4x4, 3x3): a stride-1, padding-1 3x3 convolution with 4x fewer multiplications.

The image is cut into 6x6 tiles overlapping by 2 (stride 4); each tile, each weight and each
product go through fixed linear transforms (the Toom-Cook construction of Lavin and Gray, "Fast
Algorithms for Convolutional Neural Networks", 2016, with points chosen for float32 accuracy),
and the channel mixing becomes 36 matrix products (one per transformed
position) of (tiles, C) by (C, C_out): 36/16 multiplications per output pixel and channel pair
instead of 9. The transforms of inputs and outputs run as two small dense matrix products
(Kronecker products of the 1D transforms), the transformed weights are computed once in float64
and cached until the weight changes (in place, e.g. `load_state_dict`, or by assignment).

Used on the CPU only, where the convolutions already run at the processor's peak rate, so fewer
multiplications is what makes them faster; a GPU keeps its library's convolution. Exact in real
arithmetic; in float32 about twice the direct convolution's rounding error (5e-6 against 2e-6
of the output's largest value, tests/test_backbone_dpt_arithmetic.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TILE, OUT, KERNEL = 6, 4, 3
# The interpolation points (and infinity). Lavin and Gray's 0, +-1, +-2 lose about 6x more to
# float32 rounding than the direct convolution; with -1/2 in place of -2 it is about 2x.
POINTS = (0.0, 1.0, -1.0, 2.0, -0.5)
# Below this many output pixels the direct convolution is as fast (measured on this CPU).
MIN_PIXELS = 32 * 32
BAND_VALUES = 1 << 20  # transformed values per band (36 x tiles x channels): 4 MB in float32


def toom_cook_matrices(points: tuple[float, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """1D F(4, 3) transforms (float64) for the points and infinity: output `A^T` (4, 6),
    weight `G` (6, 3) and input `B^T` (6, 6), such that for a tile d (6,) and a kernel g (3,)
    `A^T ((G g) * (B^T d))` is the correlation `y_i = sum_k d_{i+k} g_k`.

    A^T evaluates the product polynomial's output coefficients at the points, G evaluates the
    kernel polynomial (divided by the Lagrange denominators); B^T is then the unique matrix that
    makes the identity hold, found by solving the linear equations it gives.
    """
    n = TILE
    a_t = torch.zeros(OUT, n, dtype=torch.float64)
    g = torch.zeros(n, KERNEL, dtype=torch.float64)
    for j, p in enumerate(points):
        denominator = math.prod(p - q for q in points if q != p)
        a_t[:, j] = torch.tensor([p**i for i in range(OUT)], dtype=torch.float64)
        g[j] = torch.tensor([p**k / denominator for k in range(KERNEL)], dtype=torch.float64)
    a_t[OUT - 1, n - 1] = g[n - 1, KERNEL - 1] = 1.0  # the point at infinity
    # sum_j A^T[i, j] G[j, k] B^T[j, t] = [t == i + k] for every i, k, t: the coefficient of
    # the unknown B^T[j, s] in equation (i, k, t) is A^T[i, j] G[j, k] [s == t].
    identity = torch.eye(n, dtype=torch.float64)
    equations = torch.einsum("ij,jk,st->iktjs", a_t, g, identity)
    targets = torch.zeros(OUT, KERNEL, n, dtype=torch.float64)
    for i in range(OUT):
        for k in range(KERNEL):
            targets[i, k, i + k] = 1.0
    solution = torch.linalg.lstsq(equations.reshape(-1, n * n), targets.reshape(-1, 1))
    return a_t, g, solution.solution.view(n, n)


OUTPUT_1D, WEIGHT_1D, INPUT_1D = toom_cook_matrices(POINTS)
INPUT_TRANSFORM = torch.kron(INPUT_1D, INPUT_1D)  # (36, 36): tile (6x6, row-major) -> spectra
OUTPUT_TRANSFORM = torch.kron(OUTPUT_1D, OUTPUT_1D)  # (16, 36): products -> 4x4 output tile


def transform_weight(weight: Tensor) -> Tensor:
    """(C_out, C, 3, 3) -> (36, C, C_out) transformed weights, computed in float64."""
    g = WEIGHT_1D.to(weight.device)
    transformed = g @ weight.double() @ g.T  # (C_out, C, 6, 6)
    return transformed.flatten(2).permute(2, 1, 0).to(weight.dtype).contiguous()


def winograd_conv3x3(
    x: Tensor, transformed: Tensor, bias: Tensor | None, band_tiles: int = 0
) -> Tensor:
    """conv2d(x, weight, bias, padding=1) for x (B, C, H, W), from `transform_weight(weight)`;
    the output is channels_last with canonical strides. Works in bands of tile rows holding
    about `band_tiles` tiles (default: `BAND_VALUES` transformed values), so that each band's
    intermediates stay in the CPU's cache."""
    batch, channels, height, width = x.shape
    out_channels = transformed.shape[-1]
    rows, columns = math.ceil(height / OUT), math.ceil(width / OUT)
    pixels = x.permute(0, 2, 3, 1)  # (B, H, W, C), a view for a channels_last x
    right = OUT * columns + 1 - width  # zero columns: the padding and up to a whole tile
    to_input = INPUT_TRANSFORM.to(device=x.device, dtype=x.dtype)
    to_output = OUTPUT_TRANSFORM.to(device=x.device, dtype=x.dtype)
    out = x.new_empty(batch, rows, OUT, columns, OUT, out_channels)
    per_band = band_tiles or BAND_VALUES // (TILE * TILE * max(channels, out_channels))
    band_rows = max(1, per_band // (batch * columns))
    for start in range(0, rows, band_rows):
        stop = min(start + band_rows, rows)
        # The band's rows of the zero-padded map, padded here rather than the whole map at
        # once, so that the padded copy is still in cache when its tiles are read.
        top, bottom = OUT * start - 1, OUT * stop + TILE - OUT - 1
        first, last = max(top, 0), min(bottom, height)
        band = F.pad(pixels[:, first:last], (0, 0, 1, right, first - top, bottom - last))
        tiles = band.unfold(1, TILE, OUT).unfold(2, TILE, OUT)  # (B, rows, columns, C, 6, 6)
        tiles = tiles.permute(4, 5, 0, 1, 2, 3).reshape(TILE * TILE, -1)  # copied once
        spectra = (to_input @ tiles).view(TILE * TILE, -1, channels)  # (36, tiles, C)
        products = torch.bmm(spectra, transformed)  # (36, tiles, C_out)
        outputs = (to_output @ products.view(TILE * TILE, -1)).view(
            OUT, OUT, batch, stop - start, columns, out_channels
        )
        source = outputs.permute(2, 3, 0, 4, 1, 5)  # (B, rows, 4, columns, 4, C_out)
        if bias is None:
            out[:, start:stop] = source
        else:
            torch.add(source, bias, out=out[:, start:stop])
    out = out.view(batch, rows * OUT, columns * OUT, out_channels)
    if out.shape[1:3] != (height, width):
        # A fresh copy: .contiguous() keeps a size-1 map's odd strides.
        out = out[:, :height, :width].clone(memory_format=torch.contiguous_format)
    return out.permute(0, 3, 1, 2)


def _needs_grad(*tensors: Tensor | None) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)


class WinogradConv2d(nn.Conv2d):
    """A 3x3, stride-1, padding-1 `nn.Conv2d` (same parameters and state-dict keys) that runs
    Winograd F(4x4, 3x3) on the CPU for maps of at least `MIN_PIXELS` pixels when `winograd`
    is True and no gradient is needed; otherwise the direct convolution."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1, bias=bias)
        self.winograd = True
        self._cached: tuple[tuple[int, int, int], Tensor] | None = None

    def _apply(self, fn, recurse=True):  # nn.Module's signature
        # .to(), .cuda(), .double(), ...: drop the cache, not to keep a stale copy (4x the
        # weight's size) on the old device or in the old dtype.
        self._cached = None
        return super()._apply(fn, recurse)

    def transformed_weight(self) -> Tensor:
        """The transformed weight, recomputed when the weight was replaced or changed."""
        weight = self.weight
        key = (id(weight), weight.data_ptr(), weight._version)
        if self._cached is None or self._cached[0] != key:
            with torch.no_grad(), torch.inference_mode(False):  # a normal tensor, cached
                self._cached = (key, transform_weight(weight))
        return self._cached[1]

    def forward(self, x: Tensor) -> Tensor:
        use = (
            self.winograd
            and x.device.type == "cpu"
            and x.shape[2] * x.shape[3] >= MIN_PIXELS
            and not (torch.is_grad_enabled() and _needs_grad(x, self.weight, self.bias))
        )
        if not use:
            return super().forward(x)
        return winograd_conv3x3(x, self.transformed_weight(), self.bias)
