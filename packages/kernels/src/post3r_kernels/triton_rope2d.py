"""Fused RoPE2D forward and backward in Triton, portable across CUDA and ROCm.

Importing this module imports triton; `post3r_kernels.dispatch` does so only when the
`triton` implementation is first used. One kernel serves both directions: the backward of a
rotation by theta is the rotation by -theta, so it runs with `INVERSE=True`.

Design: a program owns `BLOCK_N` tokens of one batch item and a range of heads. It turns the
tokens' integer (y, x) positions into cos/sin of `pos * inv_freq` once, in registers, and reuses
them for every head it visits; no cos/sin table ever touches memory, so the traffic is one read and
one write of x, the bandwidth floor. Strides are arbitrary (head dim stride 1 lets Triton emit
vector loads), so strided q/k views of a fused qkv projection need no copy. Only portable
`tl.*` operations are used (`tl.sin`/`tl.cos` lower to each vendor's device library);
no inline assembly, no `tl.extra` calls, no vendor-only features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from triton.runtime.jit import JITFunction

from post3r_kernels.dispatch import TRITON_DTYPES


@triton.jit
def _rotate_pair(
    src, dst, src_step, dst_step, cos, sin, mask, FIRST: tl.constexpr, QUARTER: tl.constexpr
):
    """Rotate dims (FIRST + j, FIRST + QUARTER + j): u' = u cos - v sin, v' = v cos + u sin."""
    u = tl.load(src + FIRST * src_step, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(src + (FIRST + QUARTER) * src_step, mask=mask, other=0.0).to(tl.float32)
    out_dtype = dst.dtype.element_ty
    tl.store(dst + FIRST * dst_step, (u * cos - v * sin).to(out_dtype), mask=mask)
    tl.store(dst + (FIRST + QUARTER) * dst_step, (v * cos + u * sin).to(out_dtype), mask=mask)


@triton.jit
def _rope2d_kernel(
    x_ptr,
    out_ptr,
    pos_ptr,
    n_tokens,
    n_heads,
    token_blocks,
    heads_per_program,
    x_sb,
    x_sh,
    x_sn,
    x_sd,
    o_sb,
    o_sh,
    o_sn,
    o_sd,
    p_sb,
    p_sn,
    p_sc,
    log2_freq_step,
    QUARTER: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    INVERSE: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = (pid // token_blocks).to(tl.int64)
    tokens = (pid % token_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    token_ok = tokens < n_tokens
    tokens = tokens.to(tl.int64)
    j = tl.arange(0, BLOCK_Q)

    # Angles of this token block, (BLOCK_N, 1, BLOCK_Q), computed once for all heads.
    inv_freq = tl.exp2(j.to(tl.float32) * log2_freq_step)[None, None, :]
    pos = pos_ptr + batch * p_sb + tokens * p_sn
    pos_y = tl.load(pos, mask=token_ok, other=0).to(tl.float32)[:, None, None]
    pos_x = tl.load(pos + p_sc, mask=token_ok, other=0).to(tl.float32)[:, None, None]
    angle_y = pos_y * inv_freq
    angle_x = pos_x * inv_freq
    cos_y, sin_y = tl.cos(angle_y), tl.sin(angle_y)
    cos_x, sin_x = tl.cos(angle_x), tl.sin(angle_x)
    if INVERSE:
        sin_y = -sin_y
        sin_x = -sin_x

    x_rows = x_ptr + batch * x_sb + tokens[:, None, None] * x_sn + j[None, None, :] * x_sd
    o_rows = out_ptr + batch * o_sb + tokens[:, None, None] * o_sn + j[None, None, :] * o_sd
    row_ok = token_ok[:, None, None] & (j < QUARTER)[None, None, :]
    head_lo = tl.program_id(1) * heads_per_program
    head_hi = tl.minimum(head_lo + heads_per_program, n_heads)
    for head_start in range(head_lo, head_hi, BLOCK_H):
        heads = head_start + tl.arange(0, BLOCK_H)
        mask = row_ok & (heads < head_hi)[None, :, None]
        heads = heads.to(tl.int64)[None, :, None]
        src = x_rows + heads * x_sh
        dst = o_rows + heads * o_sh
        _rotate_pair(src, dst, x_sd, o_sd, cos_y, sin_y, mask, 0, QUARTER)
        _rotate_pair(src, dst, x_sd, o_sd, cos_x, sin_x, mask, 2 * QUARTER, QUARTER)


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes of one launch: tokens and heads per loop step, warps per program."""

    block_n: int
    block_h: int
    num_warps: int


# Fewer programs than this leave compute units idle (and too few bytes in flight to saturate
# HBM); heads are then split over several programs. AMD's guide asks >= 1024 workgroups on MI300.
_MIN_PROGRAMS = 1024


def default_config(quarter: int, lanes_per_warp: int = 32) -> LaunchConfig:
    """One head per loop step over a token block of ~8 elements per lane per quarter.

    With one head per step, the cos/sin tiles have exactly the data tile's shape, so no lane
    computes an angle another lane also computes (with `block_h` heads per step, every angle
    would be evaluated `block_h` times); 8 elements per lane make 16-byte bf16 vectors.
    `lanes_per_warp` is 64 on AMD CDNA wavefronts, where the same 4 warps hold twice the lanes.
    """
    lanes = 4 * lanes_per_warp
    block_n = max(16, min(512, 8 * lanes // triton.next_power_of_2(quarter)))
    return LaunchConfig(block_n=block_n, block_h=1, num_warps=4)


def _heads_per_program(n_heads: int, token_programs: int, block_h: int) -> int:
    """All heads, unless too few token blocks exist to fill the GPU; a multiple of block_h."""
    wanted_groups = triton.cdiv(_MIN_PROGRAMS, token_programs)
    groups = max(1, min(wanted_groups, triton.cdiv(n_heads, block_h)))
    return triton.cdiv(triton.cdiv(n_heads, groups), block_h) * block_h


def _empty_like_layout(x: torch.Tensor) -> torch.Tensor:
    """A dense tensor shaped like `x` whose dims are ordered in memory as x's are (by stride)."""
    order = sorted(range(x.ndim), key=lambda d: (-x.stride()[d], d))
    dense = torch.empty([x.shape[d] for d in order], dtype=x.dtype, device=x.device)
    return dense.permute([order.index(d) for d in range(x.ndim)])


def _launchable(kernel):
    # Under TRITON_INTERPRET=1 the kernel is an InterpretedFunction, which wrap_triton of some
    # torch versions rejects; eager launching it directly is equivalent.
    return wrap_triton(kernel) if isinstance(kernel, JITFunction) else kernel


def launch_rope2d(
    x: torch.Tensor,
    positions: torch.Tensor,
    base: float,
    inverse: bool = False,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """Run the kernel once, out of place; `inverse` rotates by -theta (the backward)."""
    out = _empty_like_layout(x)
    batch, n_heads, n_tokens, head_dim = x.shape
    if out.numel() == 0:
        return out
    quarter = head_dim // 4
    config = config or default_config(quarter, 64 if torch.version.hip else 32)
    token_blocks = triton.cdiv(n_tokens, config.block_n)
    heads_per_program = _heads_per_program(n_heads, batch * token_blocks, config.block_h)
    head_groups = triton.cdiv(n_heads, heads_per_program)
    _launchable(_rope2d_kernel)[(batch * token_blocks, head_groups)](
        x,
        out,
        positions,
        n_tokens,
        n_heads,
        token_blocks,
        heads_per_program,
        *x.stride(),
        *out.stride(),
        *positions.stride(),
        -math.log2(base) / quarter,
        QUARTER=quarter,
        BLOCK_Q=triton.next_power_of_2(quarter),
        BLOCK_N=config.block_n,
        BLOCK_H=config.block_h,
        INVERSE=inverse,
        num_warps=config.num_warps,
    )
    return out


@triton_op("post3r_kernels::rope2d_triton", mutates_args=())
def _rope2d_op(
    x: torch.Tensor, positions: torch.Tensor, base: float, inverse: bool
) -> torch.Tensor:
    return launch_rope2d(x, positions, base, inverse)


def _setup_context(ctx, inputs, output) -> None:
    _, positions, base, inverse = inputs
    ctx.save_for_backward(positions)
    ctx.base, ctx.inverse = base, inverse


def _backward(ctx, grad: torch.Tensor):
    (positions,) = ctx.saved_tensors
    return _rope2d_op(grad, positions, ctx.base, not ctx.inverse), None, None, None


_rope2d_op.register_autograd(_backward, setup_context=_setup_context)


def rope2d_triton(x: torch.Tensor, positions: torch.Tensor, base: float = 100.0) -> torch.Tensor:
    """Triton RoPE2D of checked inputs (see `post3r_kernels.rope2d`); differentiable."""
    if x.dtype not in TRITON_DTYPES:
        raise TypeError(
            f"impl='triton' supports float16, bfloat16 and float32 tokens, got {x.dtype}; "
            "use impl='torch' for float64"
        )
    if x.device.type != "cuda" and not interpreter_active():
        raise ValueError(
            f"impl='triton' needs x on a CUDA or ROCm device, got {x.device}; use impl='torch' "
            "(or 'auto') on CPU, or set TRITON_INTERPRET=1 before triton is imported to run "
            "Triton's interpreter"
        )
    return _rope2d_op(x, positions, base, False)


# TRITON_INTERPRET=1 at decoration time makes triton.jit return an interpreted function.
_INTERPRETED = not isinstance(_rope2d_kernel, JITFunction)


def interpreter_active() -> bool:
    """Whether triton runs this module's kernels in its CPU interpreter."""
    return _INTERPRETED
