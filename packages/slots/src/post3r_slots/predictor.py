"""Transition model from one frame's corrected slots to the next frame's starting slots."""

from __future__ import annotations

import torch
from torch import nn

from post3r_slots._checks import check_shape


class TransformerPredictor(nn.Module):
    """Pre-norm transformer encoder over the slots of one frame (SlotContrast: 1 block, 4 heads).

    Standard `1/√head_dim` attention scaling (SlotContrast's predictor multiplies the logits
    by `√head_dim` instead; that defect is not reproduced). No positional encoding and no final
    norm, so the predictor is equivariant to permuting the slots.

    Args:
        slot_dim: Ds; must be divisible by `num_heads`.
        num_blocks: transformer blocks.
        num_heads: attention heads.
        mlp_ratio: feed-forward width as a multiple of `slot_dim`.
    """

    def __init__(
        self, slot_dim: int, *, num_blocks: int = 1, num_heads: int = 4, mlp_ratio: float = 4.0
    ) -> None:
        super().__init__()
        if slot_dim % num_heads:
            raise ValueError(f"slot_dim ({slot_dim}) must be divisible by num_heads ({num_heads})")
        self.slot_dim = slot_dim
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                slot_dim,
                num_heads,
                dim_feedforward=int(slot_dim * mlp_ratio),
                dropout=0.0,
                activation="relu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(num_blocks)
        )

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        """Map slots (B, K, Ds) to predicted slots (B, K, Ds)."""
        check_shape(slots, "slots", "B K Ds", Ds=self.slot_dim)
        for block in self.blocks:
            slots = block(slots)
        return slots
