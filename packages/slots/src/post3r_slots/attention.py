"""Slot attention (Locatello et al. 2020) as used by DINOSAUR, VideoSAUR and SlotContrast."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from post3r_slots._checks import check_at_least_one, check_finite, check_shape


class SlotAttentionOutput(NamedTuple):
    """Slots after the last iteration and the attention of that iteration.

    slots: (B, K, Ds). masks: (B, K, N), the softmax over slots of the last iteration's logits
    (computed from the slots entering that iteration), so every patch's masks sum to one.
    """

    slots: torch.Tensor
    masks: torch.Tensor


class ResidualMLP(nn.Module):
    """`x + W2 · act(W1 · LayerNorm(x))`: the per-slot refinement after the GRU."""

    def __init__(self, dim: int, hidden_dim: int, activation: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden_dim), activation(), nn.Linear(hidden_dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class SlotAttention(nn.Module):
    """Iterative slot attention: slots compete for patches through a softmax over slots.

    Each iteration: `attn = softmax_K(q·kᵀ/√d)`; a weighted mean of the values with weights
    `(attn + ε) / Σ_N (attn + ε)`; a GRU update; a residual LayerNorm-MLP. Gradients flow
    through every iteration unless `implicit_gradient` is set.

    Deliberate difference from SlotContrast: the GRU's hidden state is the slots as they enter
    the iteration, as in the original Slot Attention, not their layer-normed copy.

    Args:
        feature_dim: D, the dim of the input features.
        slot_dim: Ds, the dim of a slot.
        iterations: iterations per call (SlotContrast: 2).
        first_frame_iterations: iterations when called with `first_frame=True`
            (SlotContrast: 3); defaults to `iterations`.
        qkv_dim: dim of queries, keys and values; defaults to `slot_dim`.
        mlp_hidden_dim: hidden width of the residual MLP; defaults to `4 * slot_dim`;
            0 disables the MLP (VideoSAUR).
        epsilon: added to the attention before the weighted mean.
        implicit_gradient: back-propagate through the last iteration only, the earlier ones
            treated as a fixed-point solver (Chang et al. 2022, "Object representations as
            fixed points"): steadier training, less memory, and gradients still reach the
            initial slots' parameters through a straight-through path (BO-QSA).
    """

    def __init__(
        self,
        feature_dim: int,
        slot_dim: int,
        *,
        iterations: int = 2,
        first_frame_iterations: int | None = None,
        qkv_dim: int | None = None,
        mlp_hidden_dim: int | None = None,
        epsilon: float = 1e-8,
        implicit_gradient: bool = False,
    ) -> None:
        super().__init__()
        if first_frame_iterations is None:
            first_frame_iterations = iterations
        check_at_least_one(iterations, "iterations")
        check_at_least_one(first_frame_iterations, "first_frame_iterations")
        check_at_least_one(feature_dim, "feature_dim")
        check_at_least_one(slot_dim, "slot_dim")
        qkv_dim = qkv_dim or slot_dim
        mlp_hidden_dim = 4 * slot_dim if mlp_hidden_dim is None else mlp_hidden_dim
        self.feature_dim, self.slot_dim = feature_dim, slot_dim
        self.iterations, self.first_frame_iterations = iterations, first_frame_iterations
        self.epsilon = epsilon
        self.implicit_gradient = implicit_gradient
        self.scale = qkv_dim**-0.5
        self.norm_features = nn.LayerNorm(feature_dim)
        self.to_k = nn.Linear(feature_dim, qkv_dim, bias=False)
        self.to_v = nn.Linear(feature_dim, qkv_dim, bias=False)
        self.norm_slots = nn.LayerNorm(slot_dim)
        self.to_q = nn.Linear(slot_dim, qkv_dim, bias=False)
        self.gru = nn.GRUCell(qkv_dim, slot_dim)
        self.mlp = ResidualMLP(slot_dim, mlp_hidden_dim) if mlp_hidden_dim > 0 else None

    def forward(
        self,
        slots: torch.Tensor,
        features: torch.Tensor,
        *,
        first_frame: bool = False,
        iterations: int | None = None,
    ) -> SlotAttentionOutput:
        """Refine `slots` (B, K, Ds) on `features` (B, N, D).

        `iterations` overrides the count; otherwise `first_frame` picks between
        `first_frame_iterations` and `iterations`.
        """
        sizes = check_shape(slots, "slots", "B K Ds", Ds=self.slot_dim)
        check_shape(features, "features", "B N D", B=sizes["B"], D=self.feature_dim)
        if sizes["K"] == 0:
            raise ValueError(
                f"slots must hold at least one slot (K >= 1), got {tuple(slots.shape)}"
            )
        check_finite(features, "features")
        check_finite(slots, "slots")
        if iterations is None:
            iterations = self.first_frame_iterations if first_frame else self.iterations
        check_at_least_one(iterations, "iterations")
        features = self.norm_features(features)
        keys = self.to_k(features) * self.scale
        values = self.to_v(features)
        masks = slots.new_empty(0)
        if self.implicit_gradient:
            initial = slots
            with torch.no_grad():
                for _ in range(iterations - 1):
                    slots, _ = self._iterate(slots, keys, values)
            # Straight-through: the value of the converged slots, the gradient of the initial.
            slots = slots.detach() + initial - initial.detach()
            iterations = 1
        for _ in range(iterations):
            slots, masks = self._iterate(slots, keys, values)
        return SlotAttentionOutput(slots, masks)

    def _iterate(
        self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        queries = self.to_q(self.norm_slots(slots))
        attention = torch.softmax(queries @ keys.transpose(1, 2), dim=1)  # over slots
        weights = attention + self.epsilon
        weights = weights / weights.sum(dim=-1, keepdim=True)  # weighted mean over patches
        updates = weights @ values
        batch, num_slots, _ = slots.shape
        slots = self.gru(updates.flatten(0, 1), slots.flatten(0, 1)).unflatten(
            0, (batch, num_slots)
        )
        if self.mlp is not None:
            slots = self.mlp(slots)
        return slots, attention
