"""POST3R's recurrent slot corrector: transformer decoder blocks on the slots with 2D RoPE.

A corrector (like slot attention) updates slots from a frame's features; the reference called
it a "slot decoder" after its transformer-decoder blocks.

Unlike slot attention there is no competition between slots: each slot cross-attends to the
patches with a softmax over patches. Over time the new slots are blended with the slots the
call started from through a TTT3R-style gate, `g = sigmoid(mean cross-attention logit)`,
computed per sample and per slot (TTT3R's own state gate averages over the batch; not here).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from post3r_slots._checks import check_shape
from post3r_slots._optional import require


class RecurrentSlotOutput(NamedTuple):
    """slots: (B, K, Ds). masks: (B, K, N), softmax over slots of the last block's head-mean
    cross-attention logits. gate: (B, K) in (0, 1), the weight of the new slots (applied only
    when `first_frame` is False)."""

    slots: torch.Tensor
    masks: torch.Tensor
    gate: torch.Tensor


def _kernels(feature: str) -> ModuleType:
    """post3r_kernels (the `rope` extra): RoPE2D and the token layout helpers."""
    return require("post3r_kernels", feature)


def slot_grid_positions(num_slots: int, device: torch.device | None = None) -> torch.Tensor:
    """RoPE positions (K, 2) = (y, x) of the slots, laid out row-major on a grid.

    The grid width is ⌊√K⌋ rounded up to an even number, as in POST3R (K=7 gives (0,0), (0,1),
    (1,0), (1,1), (2,0), (2,1), (3,0)). Patch positions: `post3r_kernels.grid_positions(h, w)`.
    """
    width = math.isqrt(num_slots)
    width += width % 2
    return _kernels("slot_grid_positions").row_major_positions(num_slots, max(width, 1), device)


class RopeDecoderBlock(nn.Module):
    """Pre-norm block: slot self-attention, slot→patch cross-attention, MLP; RoPE on q and k.

    Returns the new slots and the cross-attention logits (B, H, K, N) (scaled, pre-softmax).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, rope_base: float) -> None:
        super().__init__()
        self.num_heads, self.rope_base = num_heads, rope_base
        kernels = _kernels("RecurrentSlotCorrector (2D RoPE)")
        self.rope2d, self.split_heads = kernels.rope2d, kernels.split_heads
        self.merge_heads = kernels.merge_heads
        self.scale = (dim // num_heads) ** -0.5
        self.norm_self = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.out_self = nn.Linear(dim, dim)
        self.norm_cross = nn.LayerNorm(dim)
        self.norm_memory = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.out_cross = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(
        self,
        slots: torch.Tensor,
        slot_positions: torch.Tensor,
        memory: torch.Tensor,
        memory_positions: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        heads, split = self.num_heads, self.split_heads
        q, k, v = (split(t, heads) for t in self.to_qkv(self.norm_self(slots)).chunk(3, -1))
        q, k = (self.rope2d(t, slot_positions, self.rope_base) for t in (q, k))
        slots = slots + self.out_self(self.merge_heads(F.scaled_dot_product_attention(q, k, v)))

        q = split(self.to_q(self.norm_cross(slots)), heads)
        q = self.rope2d(q, slot_positions, self.rope_base)
        k, v = (split(t, heads) for t in self.to_kv(self.norm_memory(memory)).chunk(2, -1))
        k = self.rope2d(k, memory_positions, self.rope_base)
        logits = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, K, N)
        attended = torch.softmax(logits, dim=-1) @ v  # softmax over patches
        slots = slots + self.out_cross(self.merge_heads(attended))
        slots = slots + self.mlp(self.norm_mlp(slots))
        return slots, logits


class RecurrentSlotCorrector(nn.Module):
    """POST3R's slot corrector: `num_blocks` RoPE decoder blocks plus a per-sample gate.

    Called like `SlotAttention`: `(slots, features, first_frame=...)`. The features are
    layer-normed and projected to `slot_dim` once per call. Patch positions come from
    `positions` or, if omitted, from `grid_size` (or a square grid when N is a square).

    Args:
        feature_dim: D.
        slot_dim: Ds; `slot_dim / num_heads` must be a multiple of 4 (RoPE2D).
        num_blocks: decoder blocks (POST3R's `num_iterations`, 3).
        num_heads: attention heads; defaults to `max(1, slot_dim // 64)` as in POST3R.
        mlp_ratio: MLP width as a multiple of `slot_dim`.
        rope_base: RoPE2D frequency base.
        grid_size: (h, w) of the patch grid when positions are not passed.
        detach_gate: stop gradients through the gate (POST3R does; default lets them flow).
    """

    def __init__(
        self,
        feature_dim: int,
        slot_dim: int,
        *,
        num_blocks: int = 3,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        rope_base: float = 100.0,
        grid_size: tuple[int, int] | None = None,
        detach_gate: bool = False,
    ) -> None:
        super().__init__()
        num_heads = num_heads or max(1, slot_dim // 64)
        if slot_dim % num_heads or (slot_dim // num_heads) % 4:
            raise ValueError(
                f"slot_dim / num_heads must be an integer multiple of 4 for RoPE2D, "
                f"got slot_dim={slot_dim}, num_heads={num_heads}"
            )
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.feature_dim, self.slot_dim = feature_dim, slot_dim
        self.grid_size, self.detach_gate = grid_size, detach_gate
        self.norm_features = nn.LayerNorm(feature_dim)
        self.project_features = nn.Linear(feature_dim, slot_dim)
        self.blocks = nn.ModuleList(
            RopeDecoderBlock(slot_dim, num_heads, mlp_ratio, rope_base) for _ in range(num_blocks)
        )

    def forward(
        self,
        slots: torch.Tensor,
        features: torch.Tensor,
        *,
        first_frame: bool = False,
        positions: torch.Tensor | None = None,
    ) -> RecurrentSlotOutput:
        """Update `slots` (B, K, Ds) from `features` (B, N, D).

        `positions`: (B, N, 2) integer (y, x) patch positions. With `first_frame` the new
        slots are returned as they are; otherwise they are gated against the input slots.
        """
        sizes = check_shape(slots, "slots", "B K Ds", Ds=self.slot_dim)
        batch, num_slots = sizes["B"], sizes["K"]
        num_patches = check_shape(features, "features", "B N D", B=batch, D=self.feature_dim)["N"]
        positions = self._patch_positions(positions, batch, num_patches, features.device)
        slot_positions = slot_grid_positions(num_slots, features.device).expand(batch, -1, -1)
        slot_positions = slot_positions.contiguous()
        memory = self.project_features(self.norm_features(features))
        previous, gate_logit = slots, slots.new_zeros(())
        for block in self.blocks:
            slots, logits = block(slots, slot_positions, memory, positions)
            gate_logit = gate_logit + logits.mean(dim=(1, 3))  # over heads and patches
        gate = torch.sigmoid(gate_logit / len(self.blocks))
        if self.detach_gate:
            gate = gate.detach()
        masks = torch.softmax(logits.mean(dim=1), dim=1)  # over slots
        if not first_frame:
            slots = gate[..., None] * slots + (1 - gate[..., None]) * previous
        return RecurrentSlotOutput(slots, masks, gate)

    def _patch_positions(
        self, positions: torch.Tensor | None, batch: int, num_patches: int, device: torch.device
    ) -> torch.Tensor:
        if positions is not None:
            check_shape(positions, "positions", "B N 2", B=batch, N=num_patches)
            if positions.is_floating_point():
                raise ValueError(f"positions must be an integer tensor, got {positions.dtype}")
            return positions
        height, width = self.grid_size or (math.isqrt(num_patches),) * 2
        if height * width != num_patches:
            raise ValueError(
                f"features have N={num_patches} patches, which is not a {height}x{width} grid; "
                "pass grid_size=(h, w) to RecurrentSlotCorrector or positions (B, N, 2)"
            )
        grid = _kernels("RecurrentSlotCorrector (2D RoPE)").grid_positions(height, width, device)
        return grid.expand(batch, -1, -1).contiguous()
