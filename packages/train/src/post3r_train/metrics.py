"""Validation metrics of a `ModelOutput`: FG-ARI and mBO of each decoder's masks, 3D point
errors against ground truth (and the 3D metrics of `eval3d` with their baselines), the mean of
every loss term, and the number of samples evaluated.

The masks of both decoders are scored, each under its own names (`ari`, `pointmap_ari`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor
from torchmetrics import MeanMetric, Metric, MetricCollection, SumMetric

from post3r_slots import (
    ImageARI,
    ImageMBO,
    VideoARI,
    VideoMBO,
    patch_masks_to_image,
    resize_masks,
)
from post3r_train.batch import Batch
from post3r_train.eval3d import has_3d_truth, make_3d_metrics, update_3d_metrics
from post3r_train.geometry import object_point_errors

if TYPE_CHECKING:  # the model module imports this one
    from post3r_train.model import ModelOutput

MASK_METRICS = {"ari": VideoARI, "image_ari": ImageARI, "mbo": VideoMBO, "image_mbo": ImageMBO}
DECODER_PREFIXES = {"feature": "", "pointmap": "pointmap_"}
"""Metric-name prefix of each decoder's mask metrics."""


@dataclass
class ImageMasks:
    """Soft slot masks at image resolution (B, T, K, H, W) from each decoder that is built."""

    feature: Tensor | None
    pointmap: Tensor | None

    def by_decoder(self) -> dict[str, Tensor]:
        """{decoder name: masks} of the decoders present, feature decoder first."""
        masks = {"feature": self.feature, "pointmap": self.pointmap}
        return {name: value for name, value in masks.items() if value is not None}


def make_metrics(*, feature: bool, pointmap: bool, contrastive: bool) -> MetricCollection:
    """Fresh metrics for a model with the feature and/or pointmap decoder and (or not) the
    contrastive loss."""
    metrics: dict[str, Metric | MetricCollection] = {"num_samples": SumMetric()}  # videos/clips
    decoders = [name for name, built in (("feature", feature), ("pointmap", pointmap)) if built]
    for decoder in decoders:
        for name, metric in MASK_METRICS.items():
            metrics[f"{DECODER_PREFIXES[decoder]}{name}"] = metric()
    terms = ["total", *decoders] + (["contrastive"] if contrastive else [])
    for name in terms:
        metrics[f"loss_{name}"] = MeanMetric()
    if pointmap:
        metrics["object_point_error"] = MeanMetric()
        metrics["point_error"] = MeanMetric()
        metrics.update(make_3d_metrics())
    # Each decoder has its own instances of the same metric classes: compute groups would
    # fuse instances whose states happen to match after a batch and report one for both.
    return MetricCollection(metrics, compute_groups=False)


def update_metrics(
    metrics: MetricCollection,
    out: ModelOutput,
    batch: Batch,
    total: Tensor,
    parts: dict[str, Tensor],
    image_size: tuple[int, int],
    grid: tuple[int, int],
) -> ImageMasks:
    """Add one validation batch to `metrics`; returns the masks at image resolution (at the
    segmentations' resolution when the batch has them)."""
    metrics["num_samples"].update(out.slots.shape[0])
    metrics["loss_total"].update(total.detach())
    for name, value in parts.items():
        if f"loss_{name}" in metrics:
            metrics[f"loss_{name}"].update(value)
    segmentations = batch.get("segmentations")
    size = image_size if segmentations is None else tuple(segmentations.shape[-2:])
    masks = image_masks(out, size, grid)  # type: ignore[arg-type]
    if segmentations is None:
        return masks
    for decoder, value in masks.by_decoder().items():
        for name in MASK_METRICS:
            metrics[f"{DECODER_PREFIXES[decoder]}{name}"].update(value, segmentations)
    if out.pointmap is not None and "pointmap" in batch:
        errors = object_point_errors(
            out.pointmap.pointmap, out.pointmap.slot_pointmaps, out.pointmap.masks, batch
        )
        metrics["object_point_error"].update(errors.object_error, errors.object_weight)
        metrics["point_error"].update(errors.scene_error, errors.scene_weight)
        if has_3d_truth(batch):
            update_3d_metrics(metrics, out.pointmap, batch)
    return masks


def image_masks(out: ModelOutput, size: tuple[int, int], grid: tuple[int, int]) -> ImageMasks:
    """Each decoder's soft slot masks resized to `size` (B, T, K, H, W)."""
    feature = pointmap = None
    if out.feature is not None:
        feature = patch_masks_to_image(out.feature.masks.float(), size, grid_size=grid)
    if out.pointmap is not None:
        pointmap = resize_masks(out.pointmap.masks.float(), size)
    return ImageMasks(feature, pointmap)
