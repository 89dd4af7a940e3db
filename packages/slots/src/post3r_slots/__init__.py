"""post3r_slots: object-centric slot modules on plain tensors.

Slot attention, initialisers, a video processor (corrector + predictor scanned over time),
POST3R's recurrent slot corrector, feature and pointmap decoders with alpha masks, losses and
torchmetrics metrics. Shapes: B batch, T frames, N patches, D feature dim, K slots, Ds slot dim.
"""

from typing import TYPE_CHECKING

from post3r_slots.attention import ResidualMLP, SlotAttention, SlotAttentionOutput
from post3r_slots.decoders import (
    FeatureDecoderOutput,
    MLPDecoder,
    PointmapDecoder,
    PointmapDecoderOutput,
    PointmapMLPDecoder,
)
from post3r_slots.initializers import CarriedSlots, CarryOverInit, FixedLearnedInit, GaussianInit
from post3r_slots.losses import (
    LossOutput,
    feature_reconstruction_loss,
    pointmap_loss,
    slot_contrastive_loss,
)
from post3r_slots.masks import (
    masks_to_ids,
    patch_grid_size,
    patch_masks_to_ids,
    patch_masks_to_image,
    resize_masks,
    slot_point_clouds,
)
from post3r_slots.predictor import TransformerPredictor
from post3r_slots.recurrent import (
    RecurrentSlotCorrector,
    RecurrentSlotOutput,
    RopeDecoderBlock,
    slot_grid_positions,
)
from post3r_slots.video import SlotVideoProcessor, VideoSlots

if TYPE_CHECKING:
    from post3r_slots.metrics import (
        OVERLAP_ID,
        ImageARI,
        ImageMBO,
        VideoARI,
        VideoMBO,
        adjusted_rand_index,
        instance_masks_to_ids,
        mean_best_overlap,
    )

# The metrics are imported on first use: torchmetrics imports torchvision when it is installed,
# which triples the import time of a package that is otherwise torch alone.
_METRICS = (
    "OVERLAP_ID",
    "ImageARI",
    "ImageMBO",
    "VideoARI",
    "VideoMBO",
    "adjusted_rand_index",
    "instance_masks_to_ids",
    "mean_best_overlap",
)


def __getattr__(name: str) -> object:
    if name in _METRICS:
        from post3r_slots import metrics

        return getattr(metrics, name)
    if name == "RecurrentSlotDecoder":  # the old name, kept for one release
        import warnings

        warnings.warn(
            "post3r_slots.RecurrentSlotDecoder is now RecurrentSlotCorrector (it corrects slots "
            "from features, like SlotAttention; it decodes nothing)",
            DeprecationWarning,
            stacklevel=2,
        )
        return RecurrentSlotCorrector
    raise AttributeError(f"module 'post3r_slots' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_METRICS})


__all__ = [
    "OVERLAP_ID",
    "CarriedSlots",
    "CarryOverInit",
    "FeatureDecoderOutput",
    "FixedLearnedInit",
    "GaussianInit",
    "ImageARI",
    "ImageMBO",
    "LossOutput",
    "MLPDecoder",
    "PointmapDecoder",
    "PointmapDecoderOutput",
    "PointmapMLPDecoder",
    "RecurrentSlotCorrector",
    "RecurrentSlotOutput",
    "ResidualMLP",
    "RopeDecoderBlock",
    "SlotAttention",
    "SlotAttentionOutput",
    "SlotVideoProcessor",
    "TransformerPredictor",
    "VideoARI",
    "VideoMBO",
    "VideoSlots",
    "adjusted_rand_index",
    "feature_reconstruction_loss",
    "instance_masks_to_ids",
    "masks_to_ids",
    "mean_best_overlap",
    "patch_grid_size",
    "patch_masks_to_ids",
    "patch_masks_to_image",
    "pointmap_loss",
    "resize_masks",
    "slot_contrastive_loss",
    "slot_grid_positions",
    "slot_point_clouds",
]
