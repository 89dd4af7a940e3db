"""Transformer building blocks of the CUT3R architecture (pre-norm ViT blocks with 2D RoPE).

Attribute names match the original modules so that checkpoint keys map one to one.
All LayerNorms use eps = 1e-6 and GELU is the exact (erf) form, as in the original.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from post3r_kernels import merge_heads, rope2d, split_heads

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def autocast_off(device: torch.device) -> AbstractContextManager:
    """Disable autocast for float32 sections (heads, state); a no-op on the meta device."""
    return nullcontext() if device.type == "meta" else torch.autocast(device.type, enabled=False)


def normal(*shape: int, std: float) -> Tensor:
    """N(0, std^2) initial values; left empty on the meta device (sampling there is slow)."""
    values = torch.empty(shape)
    return values if values.is_meta else values.normal_(std=std)


def rotate(
    x: Tensor, positions: Tensor | None, base: float, rope_dtype: torch.dtype | None
) -> Tensor:
    """2D RoPE on (B, H, N, D) tokens, or identity when there are no positions.

    `rope_dtype` rounds q/k through that dtype first (float16 reproduces the original image
    encoder); otherwise float32/float16/bfloat16 tokens are rotated in float32 and keep their dtype.
    """
    if positions is None:
        return x
    if rope_dtype is not None:
        return rope2d(x.to(rope_dtype), positions, base=base).to(x.dtype)
    return rope2d(x, positions, base=base)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Self-attention with a fused qkv projection and 2D RoPE on q and k."""

    def __init__(
        self, dim: int, heads: int, rope_base: float, rope_dtype: torch.dtype | None = None
    ):
        super().__init__()
        self.heads = heads
        self.rope_base = rope_base
        self.rope_dtype = rope_dtype
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, positions: Tensor | None) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        q = rotate(q, positions, self.rope_base, self.rope_dtype)
        k = rotate(k, positions, self.rope_base, self.rope_dtype)
        return self.proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class CrossAttention(nn.Module):
    """Cross-attention with separate q/k/v projections and 2D RoPE on q and k.

    With `alignment=True` it also returns, per query, the mean over heads and keys of the scaled
    attention logits, `mean_{h,j} q_h . k_hj / sqrt(d)`. It is computed as `q_h . mean_j(k_hj)`
    (the mean is linear), so the logits are never materialised and SDPA stays fused.
    """

    def __init__(self, dim: int, heads: int, rope_base: float) -> None:
        super().__init__()
        self.heads = heads
        self.rope_base = rope_base
        self.projq = nn.Linear(dim, dim)
        self.projk = nn.Linear(dim, dim)
        self.projv = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        query: Tensor,
        memory: Tensor,
        query_pos: Tensor | None,
        memory_pos: Tensor | None,
        alignment: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        q = rotate(split_heads(self.projq(query), self.heads), query_pos, self.rope_base, None)
        k = rotate(split_heads(self.projk(memory), self.heads), memory_pos, self.rope_base, None)
        v = split_heads(self.projv(memory), self.heads)
        out = self.proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))
        if not alignment:
            return out, None
        mean_key = k.float().mean(dim=2, keepdim=True)  # (B, H, 1, D)
        logits = (q.float() * mean_key).sum(-1) * q.shape[-1] ** -0.5  # (B, H, Nq)
        return out, logits.mean(dim=1)


class Block(nn.Module):
    """Pre-norm ViT block: x += Attn(LN x); x += MLP(LN x)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float,
        rope_base: float,
        rope_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, heads, rope_base, rope_dtype)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, positions: Tensor | None) -> Tensor:
        x = x + self.attn(self.norm1(x), positions)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """x += SelfAttn(LN1 x); x += CrossAttn(LN2 x, LN_y y); x += MLP(LN3 x)."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float, rope_base: float, norm_memory: bool = True
    ):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, heads, rope_base)
        self.cross_attn = CrossAttention(dim, heads, rope_base)
        self.norm2 = LayerNorm(dim)
        self.norm3 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm_y = LayerNorm(dim) if norm_memory else nn.Identity()

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        x_pos: Tensor | None,
        y_pos: Tensor | None,
        alignment: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Returns the updated x and, if asked, the per-query mean cross-attention logit."""
        x = x + self.attn(self.norm1(x), x_pos)
        attended, logits = self.cross_attn(self.norm2(x), self.norm_y(y), x_pos, y_pos, alignment)
        x = x + attended
        return x + self.mlp(self.norm3(x)), logits


class ModLN(nn.Module):
    """adaLN: LN(x) * (1 + scale) + shift with [shift, scale] = Linear(SiLU(condition))."""

    def __init__(self, dim: int, condition_dim: int) -> None:
        super().__init__()
        self.norm = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(condition_dim, dim * 2))

    def forward(self, x: Tensor, condition: Tensor) -> Tensor:
        shift, scale = self.mlp(condition).unsqueeze(1).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class ConditionModulationBlock(nn.Module):
    """A pre-norm ViT block whose LayerNorms are modulated by a condition (the pose token)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, rope_base: float) -> None:
        super().__init__()
        self.norm1 = ModLN(dim, dim)
        self.attn = Attention(dim, heads, rope_base)
        self.norm2 = ModLN(dim, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, condition: Tensor, positions: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x, condition), positions)
        return x + self.mlp(self.norm2(x, condition))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: (B, C, H, W) -> (B, H/p * W/p, dim), row-major tokens."""

    def __init__(self, in_channels: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        # Contiguous tokens: the transposed view would carry its layout into every residual sum
        # of the encoder (an elementwise op's output follows its first input's strides), and
        # each block's adds and LayerNorms would then run on a transposed stream, several
        # times slower on the CPU (issue 18).
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()
