"""The training objective: the weighted feature, pointmap and slot-contrastive losses of a
`ModelOutput`.

The pointmap term is scale-invariant with one scale per clip, so the frames of a clip keep their
relative scale; with the teacher's confidence it is DUSt3R's `C·d − α·log C` with C clipped
(bounded weights, unlike the reference's raw `1 + exp(x)`).
"""

from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING

import torch.distributed as dist
from torch import Tensor

from post3r_slots import feature_reconstruction_loss, pointmap_loss, slot_contrastive_loss
from post3r_train.config import LossConfig

if TYPE_CHECKING:  # the model module imports this one
    from post3r_train.model import ModelOutput


def total_loss(out: ModelOutput, cfg: LossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted total and every term on its own (detached), named for logging:
    `feature`, `pointmap` (with `pointmap/<part>`), `contrastive` (with its accuracy)."""
    total = out.slots.new_zeros(())
    parts: dict[str, Tensor] = {}
    if out.feature is not None:
        feature = feature_reconstruction_loss(out.feature.reconstruction, out.feature.target).loss
        total = total + cfg.feature_weight * feature
        parts["feature"] = feature.detach()
    if out.pointmap is not None and out.pointmap.target is not None:
        target = out.pointmap.target
        confidence = target.confidence if cfg.pointmap_confidence else None
        result = pointmap_loss(
            out.pointmap.prediction.float(),
            target.points.float(),
            confidence=confidence,
            alpha=cfg.confidence_alpha,
            max_confidence=cfg.max_confidence,
            normalization="clip",
        )
        total = total + cfg.pointmap_weight * result.loss
        parts["pointmap"] = result.loss.detach()
        parts.update(
            {f"pointmap/{k.removeprefix('pointmap_')}": v for k, v in result.parts.items()}
        )
    if cfg.contrastive_weight > 0 and out.slots.shape[1] < 2:
        _warn_single_frame_contrastive(cfg.contrastive_weight)
    if cfg.contrastive_weight > 0 and out.slots.shape[1] > 1:
        result = slot_contrastive_loss(
            out.slots.float(),
            temperature=cfg.contrastive_temperature,
            gather_distributed=dist.is_available() and dist.is_initialized(),
        )
        total = total + cfg.contrastive_weight * result.loss
        parts["contrastive"] = result.loss.detach()
        parts["contrastive/accuracy"] = result.parts["contrastive_accuracy"]
    return total, parts


@functools.cache
def _warn_single_frame_contrastive(weight: float) -> None:
    """Once per process: a one-frame clip has no frame pair, so the contrastive term is 0."""
    warnings.warn(
        f"loss.contrastive_weight={weight} but the clips have one frame: the temporal "
        "contrastive term needs two or more (dataset.chunk_size >= 2) and is left out",
        stacklevel=3,
    )
