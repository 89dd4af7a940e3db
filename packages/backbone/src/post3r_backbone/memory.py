"""Pose memory (the original `LocalMemory`, stored as `pose_retriever`).

A bank of `size` tokens of width `2 * dec_dim`. Reading: the frame's mean encoder token,
projected to `dec_dim` and paired with a learned "masked pose" half, cross-attends to the bank;
the second half of the result is the pose query for the decoder. Writing: the bank tokens
self-attend and cross-attend to the pair (projected frame summary, decoded pose token).
No positional encoding is used here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from post3r_backbone.layers import DecoderBlock, normal


class PoseRetriever(nn.Module):
    def __init__(
        self, size: int, enc_dim: int, dec_dim: int, heads: int, mlp_ratio: float = 4.0
    ) -> None:
        super().__init__()
        self.dec_dim = dec_dim
        width = 2 * dec_dim
        self.proj_q = nn.Linear(enc_dim, dec_dim)
        self.masked_token = nn.Parameter(normal(1, 1, dec_dim, std=0.2))
        self.mem = nn.Parameter(normal(1, size, width, std=0.2))
        self.write_blocks = nn.ModuleList(
            DecoderBlock(width, heads, mlp_ratio, rope_base=1.0) for _ in range(2)
        )
        self.read_blocks = nn.ModuleList(
            DecoderBlock(width, heads, mlp_ratio, rope_base=1.0) for _ in range(2)
        )

    def read(self, summary: Tensor, memory: Tensor) -> Tensor:
        """(B, 1, enc_dim) frame summary, (B, M, 2 dec_dim) memory -> (B, 1, dec_dim) pose query."""
        query = self.proj_q(summary)
        x = torch.cat([query, self.masked_token.expand(query.shape[0], -1, -1)], dim=-1)
        for block in self.read_blocks:
            x, _ = block(x, memory, None, None)
        return x[..., -self.dec_dim :]

    def write(self, memory: Tensor, summary: Tensor, pose_token: Tensor) -> Tensor:
        """Candidate new memory after observing this frame's summary and decoded pose token."""
        query = self.proj_q(summary)
        entry = torch.cat([query, pose_token], dim=-1)
        for block in self.write_blocks:
            memory, _ = block(memory, entry, None, None)
        return memory
