"""Scan a corrector (and optional predictor) over the frames of a video."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from post3r_slots._checks import check_shape
from post3r_slots.initializers import CarryOverInit


class VideoSlots(NamedTuple):
    """Per-frame outputs of `SlotVideoProcessor`.

    slots: (B, T, K, Ds), the corrected slots of each frame (what decoders and losses use).
    predicted: (B, T, K, Ds), the predictor's output, i.e. the starting slots of frame t+1;
        pass `predicted[:, -1]` as `previous_slots` to continue the video in the next call.
    masks: (B, T, K, N), the corrector's attention masks.
    """

    slots: torch.Tensor
    predicted: torch.Tensor
    masks: torch.Tensor


class SlotVideoProcessor(nn.Module):
    """Corrector plus predictor scanned over time: features (B, T, N, D) → slots (B, T, K, Ds).

    Frame t is corrected from the slots predicted at t-1 (from the initialiser at the first
    frame, where the corrector is called with `first_frame=True`). The predictor also runs on
    the last frame so that its output can seed the next call.

    Args:
        initializer: `initializer(batch_size) -> (B, K, Ds)`, e.g. `FixedLearnedInit`;
            wrapped in `CarryOverInit` unless it already is one.
        corrector: `SlotAttention` or `RecurrentSlotCorrector` (any module called as
            `corrector(slots, features, first_frame=bool) -> (slots, masks, ...)`).
        predictor: e.g. `TransformerPredictor`; None carries the corrected slots over.
        detach_between_frames: cut gradients between frames (POST3R) instead of
            backpropagating through the whole clip (SlotContrast).
    """

    def __init__(
        self,
        initializer: nn.Module,
        corrector: nn.Module,
        predictor: nn.Module | None = None,
        *,
        detach_between_frames: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(initializer, CarryOverInit):
            initializer = CarryOverInit(initializer)
        self.initializer, self.corrector, self.predictor = initializer, corrector, predictor
        self.detach_between_frames = detach_between_frames

    def forward(
        self,
        features: torch.Tensor,
        *,
        previous_slots: torch.Tensor | None = None,
        reset: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> VideoSlots:
        """Process `features` (B, T, N, D).

        previous_slots: (B, K, Ds) to continue from (`predicted[:, -1]` of the last call);
            None starts every sample fresh.
        reset: (B,) bool, samples that start a new video although `previous_slots` is given.
        positions: (B, N, 2) or (B, T, N, 2) integer patch positions, for correctors that take
            them (RecurrentSlotCorrector).
        """
        sizes = check_shape(features, "features", "B T N D")
        batch, frames = sizes["B"], sizes["T"]
        if positions is not None:
            check_shape(positions, "positions", "B [T] N 2", B=batch, T=frames, N=sizes["N"])
        slots, fresh = self.initializer(batch, previous_slots, reset)
        first_frame = True if previous_slots is None else fresh
        corrected, predicted, masks = [], [], []
        for t in range(frames):
            frame_positions = positions
            if positions is not None and positions.ndim == 4:
                frame_positions = positions[:, t]
            slots_t, masks_t = self._correct(slots, features[:, t], first_frame, frame_positions)
            first_frame = False
            slots = self.predictor(slots_t) if self.predictor is not None else slots_t
            corrected.append(slots_t)
            predicted.append(slots)
            masks.append(masks_t)
            if self.detach_between_frames:
                slots = slots.detach()
        return VideoSlots(
            *(torch.stack(per_frame, dim=1) for per_frame in (corrected, predicted, masks))
        )

    def _correct(
        self,
        slots: torch.Tensor,
        features: torch.Tensor,
        first_frame: bool | torch.Tensor,
        positions: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the corrector; a per-sample `first_frame` mask splits the batch in two calls."""
        extra = {} if positions is None else {"positions": positions}
        if isinstance(first_frame, torch.Tensor):
            if bool(first_frame.all()) or not bool(first_frame.any()):
                first_frame = bool(first_frame[0])
            else:
                return self._correct_mixed(slots, features, first_frame, positions)
        out = self.corrector(slots, features, first_frame=first_frame, **extra)
        return out[0], out[1]

    def _correct_mixed(
        self,
        slots: torch.Tensor,
        features: torch.Tensor,
        first_frame: torch.Tensor,
        positions: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        parts = []
        for is_first in (True, False):
            index = (first_frame == is_first).nonzero().squeeze(1)
            part_positions = None if positions is None else positions[index]
            part = self._correct(slots[index], features[index], is_first, part_positions)
            parts.append((index, part))
        (index_a, (slots_a, masks_a)), (index_b, (slots_b, masks_b)) = parts
        order = torch.argsort(torch.cat((index_a, index_b)))
        return torch.cat((slots_a, slots_b))[order], torch.cat((masks_a, masks_b))[order]
