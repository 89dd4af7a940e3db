"""Object-discovery metrics: FG-ARI and mBO per image or per video, as torchmetrics Metrics.

Ground truth is a map of instance ids, 0 = background (convert SlotContrast's one-channel-per-
instance layout with `instance_masks_to_ids`). Predictions are slot masks
(B, [T,] K, H, W), soft or hard, or predicted ids. Semantics follow SlotContrast (slots.md §4):

- `ignore_background=True` (default) leaves background pixels out of every count: FG-ARI, and
  mBO over foreground objects only (the slot masks still cover background pixels, which count
  against a slot's IoU). With False, id 0 is one more object.
- `ignore_overlaps`: pixels that belong to several instances (id `OVERLAP_ID`, from the
  converter) are left out of all counts; without it their presence raises `ValueError`.
- Samples (frames for Image*, videos for Video*) without a foreground pixel are skipped; with
  `count_background_only=True` ARI scores them 1.0 instead (SlotContrast's MOVi behaviour).
- `soft_masks=False` (default) takes the argmax over slots (ties to the lowest index);
  `True` uses the masks as fractional assignments in the contingency counts.
- mBO: every object takes the best IoU over all slots (`matching="overlap"`), or the slots
  are matched one-to-one by scipy's `linear_sum_assignment` (`"hungarian"`: mIoU).

States are a float64 sum of per-sample scores and a sample count, reduced by sum, so the
metrics sync across DDP ranks. `compute` returns NaN when no sample was counted.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric

from post3r_slots._checks import check_finite, check_shape
from post3r_slots._optional import require

OVERLAP_ID = -1
"""Id of pixels that belong to more than one ground-truth instance."""

_SOFT_CHUNK = 1 << 22  # points per chunk when accumulating soft counts in float64


def instance_masks_to_ids(
    masks: torch.Tensor, *, channel_dim: int = -3, background_channel: bool = False
) -> torch.Tensor:
    """Convert one-channel-per-instance masks (SlotContrast layout) to instance ids.

    Args:
        masks: nonzero where an instance is present, e.g. (B, T, C, H, W) bool from the data
            pipeline (`channel_dim=-3`) or a raw `segmentations.npy` (T, H, W, I) uint8
            holding category ids (`channel_dim=-1`).
        channel_dim: the instance-channel dim.
        background_channel: channel 0 is the background (MOVi's one-hot masks).

    Returns:
        int64 ids with the channel dim removed: 0 background, `c + 1` for instance channel c
        (`c` when `background_channel`), `OVERLAP_ID` where several instances are set.
    """
    present = torch.as_tensor(masks).movedim(channel_dim, -1) != 0
    if background_channel:
        present = present[..., 1:]
    count = present.sum(dim=-1)
    first = present.to(torch.uint8).argmax(dim=-1) + 1
    ids = torch.where(count == 0, 0, first)
    return torch.where(count > 1, OVERLAP_ID, ids).long()


def _samples(
    pred: torch.Tensor, target: torch.Tensor, video: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and fold metric inputs to per-sample layouts: target (S, ...points) and
    pred (S, K, ...points) masks or (S, ...points) ids."""
    layout = "B T H W" if video else "B [T] H W"
    sizes = check_shape(target, "target", layout)
    if target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(
            f"target must hold integer instance ids (0 = background), got dtype {target.dtype}; "
            "convert one-channel-per-instance masks with instance_masks_to_ids"
        )
    has_time = "T" in sizes
    if pred.ndim == target.ndim:
        check_shape(pred, "pred", layout.replace("[T]", "T") if has_time else "B H W", **sizes)
        if pred.is_floating_point():
            raise ValueError(f"pred with target's rank must hold integer ids, got {pred.dtype}")
        is_masks = False
    elif pred.ndim == target.ndim + 1:
        check_shape(pred, "pred", "B T K H W" if has_time else "B K H W", **sizes)
        check_finite(pred, "pred masks", on_device=True)  # a score of NaN masks means nothing
        is_masks = True
    else:
        raise ValueError(
            f"pred must be slot masks (B, [T,] K, H, W) or ids (B, [T,] H, W) matching "
            f"target {tuple(target.shape)}, got {tuple(pred.shape)}"
        )
    if has_time and video:
        return (pred.movedim(2, 1) if is_masks else pred), target
    if has_time:
        return pred.flatten(0, 1), target.flatten(0, 1)
    return pred, target


def _contingency(
    pred: torch.Tensor, target: torch.Tensor, soft_masks: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts (S, C, K) float64 of points per (ground-truth label, slot), and the C label ids.

    `pred`: (S, K, P) masks or (S, P) ids; `target`: (S, P) ids.
    """
    labels, target_index = torch.unique(target, return_inverse=True)
    num_samples, num_labels = target.shape[0], labels.numel()
    rows = torch.arange(num_samples, device=target.device)[:, None] * num_labels + target_index
    if pred.ndim == 3 and soft_masks:
        return _soft_contingency(pred, rows, num_samples * num_labels), labels
    if pred.ndim == 3:
        num_slots, pred_index = pred.shape[1], pred.argmax(dim=1)
    else:
        pred_index = torch.unique(pred, return_inverse=True)[1]
        num_slots = int(pred_index.max()) + 1 if pred_index.numel() else 1
    flat = (rows * num_slots + pred_index).flatten()
    counts = torch.bincount(flat, minlength=num_samples * num_labels * num_slots)
    return counts.view(num_samples, num_labels, num_slots).double(), labels


def _soft_contingency(masks: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    num_samples, num_slots = masks.shape[:2]
    totals = masks.sum(dim=1, dtype=torch.float64)
    if bool((masks < 0).any()) or not bool(((totals - 1).abs() <= 1e-2).all()):
        raise ValueError(
            "soft_masks=True needs masks that are non-negative and sum to 1 over the slots "
            "(softmax probabilities, e.g. decoder masks), not logits; per-pixel sums range over "
            f"[{float(totals.min()):.3g}, {float(totals.max()):.3g}]"
        )
    counts = masks.new_zeros(num_rows, num_slots, dtype=torch.float64)
    weights = masks.movedim(1, -1).reshape(-1, num_slots)
    rows = rows.flatten()
    for start in range(0, rows.numel(), _SOFT_CHUNK):
        chunk = slice(start, start + _SOFT_CHUNK)
        counts.index_add_(0, rows[chunk], weights[chunk].double())
    return counts.view(num_samples, -1, num_slots)


def _split_rows(
    labels: torch.Tensor, ignore_background: bool, ignore_overlaps: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks over labels: which are counted at all, and which are objects."""
    overlap = labels == OVERLAP_ID
    if overlap.any() and not ignore_overlaps:
        raise ValueError(
            f"target has pixels with several instances (id {OVERLAP_ID}); pass "
            "ignore_overlaps=True to leave them out"
        )
    if (labels < OVERLAP_ID).any():
        raise ValueError(f"target ids must be >= 0 (or {OVERLAP_ID} for overlaps)")
    counted = ~overlap
    objects = counted & (labels != 0) if ignore_background else counted
    return counted, objects


def _flatten_points(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pred masks (S, K, ...) → (S, K, P) float, or ids (S, ...) → (S, P); target → (S, P)."""
    if pred.ndim == target.ndim + 1:
        pred = pred.flatten(2)
        return (pred if pred.is_floating_point() else pred.float()), target.flatten(1)
    if pred.ndim == target.ndim and not pred.is_floating_point():
        return pred.flatten(1), target.flatten(1)
    raise ValueError(
        f"pred must be masks (S, K, ...) or integer ids (S, ...) for target {tuple(target.shape)}, "
        f"got {tuple(pred.shape)} {pred.dtype}"
    )


def adjusted_rand_index(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_background: bool = True,
    ignore_overlaps: bool = False,
    soft_masks: bool = False,
    count_background_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ARI per sample. The first dim indexes samples; the rest are one sample's points.

    Args:
        pred: masks (S, K, ...) (float) or ids (S, ...) (integer).
        target: ids (S, ...), 0 = background.

    Returns:
        (scores (S,) float64, counted (S,) bool): samples to skip have `counted` False.
    """
    pred, target = _flatten_points(pred, target)
    counts, labels = _contingency(pred, target, soft_masks)
    counted, objects = _split_rows(labels, ignore_background, ignore_overlaps)
    scores = _ari_from_counts(counts[:, objects])
    keep = counts[:, objects].sum(dim=(1, 2)) > 0
    if count_background_only:
        keep = counts[:, counted].sum(dim=(1, 2)) > 0
    return scores, keep


def _ari_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """ARI from contingency counts (S, C, K); 1.0 where the index is undefined (as sklearn)."""
    true_sizes, pred_sizes = counts.sum(dim=2), counts.sum(dim=1)
    num_points = true_sizes.sum(dim=1)
    pairs = (counts * (counts - 1)).sum(dim=(1, 2))
    true_pairs = (true_sizes * (true_sizes - 1)).sum(dim=1)
    pred_pairs = (pred_sizes * (pred_sizes - 1)).sum(dim=1)
    expected = true_pairs * pred_pairs / (num_points * (num_points - 1)).clamp(min=1)
    maximum = (true_pairs + pred_pairs) / 2
    denominator = maximum - expected
    ari = (pairs - expected) / torch.where(denominator == 0, 1.0, denominator)
    return torch.where(denominator == 0, 1.0, ari)


def mean_best_overlap(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_background: bool = True,
    ignore_overlaps: bool = False,
    soft_masks: bool = False,
    matching: str = "overlap",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over ground-truth objects of their matched IoU, per sample.

    Layouts as `adjusted_rand_index`. Objects absent from a sample are not counted;
    samples without objects have `counted` False.
    """
    if matching not in ("overlap", "hungarian"):
        raise ValueError(f"matching must be 'overlap' or 'hungarian', got {matching!r}")
    pred, target = _flatten_points(pred, target)
    counts, labels = _contingency(pred, target, soft_masks)
    counted, objects = _split_rows(labels, ignore_background, ignore_overlaps)
    slot_sizes = counts[:, counted].sum(dim=1, keepdim=True)  # (S, 1, K), overlaps left out
    intersection = counts[:, objects]
    object_sizes = intersection.sum(dim=2, keepdim=True)
    union = object_sizes + slot_sizes - intersection
    iou = torch.where(union > 0, intersection / union.clamp(min=1e-12), 0.0)
    present = object_sizes.squeeze(2) > 0
    best = iou.max(dim=2).values if matching == "overlap" else _hungarian(iou, present)
    num_objects = present.sum(dim=1)
    scores = (best * present).sum(dim=1) / num_objects.clamp(min=1)
    return scores, num_objects > 0


def _hungarian(iou: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """IoU of each present object under the one-to-one assignment maximising total IoU."""
    linear_sum_assignment = require("scipy.optimize", "Hungarian matching").linear_sum_assignment
    best = torch.zeros(iou.shape[:2], dtype=iou.dtype)
    for sample, (matrix, rows) in enumerate(zip(iou.cpu(), present.cpu(), strict=True)):
        objects = rows.nonzero().squeeze(1)
        matched_rows, matched_cols = linear_sum_assignment(matrix[objects].numpy(), maximize=True)
        best[sample, objects[matched_rows]] = matrix[objects[matched_rows], matched_cols]
    return best.to(iou.device)


class _SampleMeanMetric(Metric):
    """Mean of per-sample scores, kept as a float64 sum and a count reduced by sum.

    The states are named after the metric (`image_ari_sum`, `image_ari_count`, ...) so that
    a `MetricCollection` never fuses two different metrics into one compute group because
    their states happened to be equal after the first batch. Two instances of the same class
    (e.g. one per decoder) can still be fused that way: build such collections with
    `compute_groups=False`.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    video = False
    state_name = ""

    def __init__(
        self,
        *,
        ignore_background: bool = True,
        ignore_overlaps: bool = False,
        soft_masks: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.options = {
            "ignore_background": ignore_background,
            "ignore_overlaps": ignore_overlaps,
            "soft_masks": soft_masks,
        }
        self._sum, self._count = f"{self.state_name}_sum", f"{self.state_name}_count"
        self.add_state(self._sum, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state(self._count, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @property
    def num_samples(self) -> torch.Tensor:
        """How many samples (frames or videos) have been counted."""
        return getattr(self, self._count)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred: masks (B, [T,] K, H, W) or ids (B, [T,] H, W); target: ids (B, [T,] H, W)."""
        pred, target = _samples(pred, target, self.video)
        if self.options["soft_masks"] and pred.ndim == target.ndim:
            raise ValueError("soft_masks=True needs pred as float masks (B, [T,] K, H, W), got ids")
        scores, counted = self._score(pred, target)
        total, count = getattr(self, self._sum), getattr(self, self._count)
        setattr(self, self._sum, total + scores[counted].sum().to(total.device))
        setattr(self, self._count, count + counted.sum().to(count.device))

    def compute(self) -> torch.Tensor:
        if self.num_samples == 0:
            return torch.tensor(math.nan, dtype=torch.float64)
        return getattr(self, self._sum) / self.num_samples

    def _score(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class _ARIMetric(_SampleMeanMetric):
    def __init__(self, *, count_background_only: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.count_background_only = count_background_only

    def _score(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return adjusted_rand_index(
            pred, target, count_background_only=self.count_background_only, **self.options
        )


class _MBOMetric(_SampleMeanMetric):
    def __init__(self, *, matching: str = "overlap", **kwargs) -> None:
        if matching not in ("overlap", "hungarian"):
            raise ValueError(f"matching must be 'overlap' or 'hungarian', got {matching!r}")
        super().__init__(**kwargs)
        self.matching = matching

    def _score(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return mean_best_overlap(pred, target, matching=self.matching, **self.options)


class ImageARI(_ARIMetric):
    """FG-ARI per frame (every frame of a (B, T, ...) input is its own sample), averaged.

    Keyword options: ignore_background, ignore_overlaps, soft_masks, count_background_only
    (see the module docstring), plus torchmetrics `Metric` kwargs.
    """

    state_name = "image_ari"


class VideoARI(_ARIMetric):
    """FG-ARI over each whole video (all T·H·W points in one clustering), averaged over videos;
    a slot that switches objects over time is penalised. Inputs need the T dim."""

    state_name = "video_ari"
    video = True


class ImageMBO(_MBOMetric):
    """mBO per frame, averaged over frames. Options as `ImageARI` plus `matching`."""

    state_name = "image_mbo"


class VideoMBO(_MBOMetric):
    """mBO over each whole video: an object's IoU is over its spatio-temporal tube."""

    state_name = "video_mbo"
    video = True
