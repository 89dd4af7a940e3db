"""3D metrics as torchmetrics `Metric`s: per-object reconstruction of slots (accuracy,
completeness, Chamfer), video depth (Abs Rel, δ < 1.25) and camera trajectory (ATE, RPE).

Every state is a sum or a count reduced by sum, so the metrics sync across DDP ranks and a
2-rank evaluation equals a 1-rank one. `compute` returns a dict of floats (NaN where nothing was
counted) whose names start with the metric's `prefix`; the names of counts contain `num_`
(`is_count`). The protocols (alignment, averaging) are in each class's docstring and in
packages/train/README.md ("3D evaluation").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from post3r_train.alignment import (
    depth_scale,
    depth_scale_and_shift,
    least_squares_scale,
    umeyama_sim3,
)

DEPTH_ALIGNMENTS = ("scale", "scale&shift")


def is_count(name: str) -> bool:
    """Whether a metric name (as `compute` returns it) is a count rather than a score."""
    return "num_" in name.rsplit("/", 1)[-1]


def _float64(value: float = 0.0) -> Tensor:
    return torch.tensor(value, dtype=torch.float64)


def _long() -> Tensor:
    return torch.tensor(0, dtype=torch.long)


def _mean(total: Tensor, count: Tensor) -> float:
    return float(total / count) if int(count) > 0 else math.nan


def resize_nearest(x: Tensor, size: tuple[int, ...]) -> Tensor:
    """(B, T, H, W, ...) -> (B, T, h, w, ...) by nearest sampling (labels and 3D points keep
    their values: no blending across object boundaries)."""
    if tuple(x.shape[2:4]) == tuple(size):
        return x
    trailing = x.shape[4:]
    flat = x.flatten(0, 1).reshape(-1, *x.shape[2:4], math.prod(trailing)).movedim(-1, 1)
    flat = F.interpolate(flat.double(), size=tuple(size), mode="nearest-exact")
    return flat.movedim(1, -1).reshape(*x.shape[:2], *size, *trailing).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Per-object reconstruction


def slot_ownership(slot_masks: Tensor) -> Tensor:
    """(..., K, h, w) soft masks -> bool: a pixel belongs to every slot whose mask is the
    largest there (ties share it: all-equal masks give every slot the whole frame)."""
    return slot_masks >= slot_masks.amax(dim=-3, keepdim=True)


def _subsample(points: Tensor, max_points: int) -> Tensor:
    """At most `max_points` of (N, 3), evenly spaced in their order (deterministic)."""
    if points.shape[0] <= max_points:
        return points
    index = torch.linspace(0, points.shape[0] - 1, max_points, device=points.device)
    return points[index.round().long()]


def accuracy_completeness(prediction: Tensor, truth: Tensor) -> tuple[Tensor, Tensor]:
    """Mean distance from each predicted point to its nearest true point (accuracy) and from
    each true point to its nearest predicted point (completeness); (N, 3), (M, 3) non-empty."""
    distances = torch.cdist(prediction.double()[None], truth.double()[None])[0]
    return distances.min(dim=1).values.mean(), distances.min(dim=0).values.mean()


def video_object_distances(
    slot_points: Tensor,
    slot_masks: Tensor,
    composite: Tensor,
    gt_points: Tensor,
    gt_ids: Tensor,
    max_points: int = 4096,
) -> tuple[list[tuple[Tensor, Tensor]], int]:
    """Accuracy and completeness of every ground-truth object of one video, and the number of
    objects whose matched slot had no finite point (left unscored).

    Args (one video, at the prediction's resolution): slot_points (T, K, h, w, 3), slot_masks
    (T, K, h, w), composite (T, h, w, 3) the scene's pointmap, gt_points (T, h, w, 3) in the
    prediction's frame (non-finite = invalid), gt_ids (T, h, w) instance ids (0 = background).

    Distances are after one least-squares scale for the whole video (composite vs truth over
    every valid pixel) and divided by the video's mean true point norm (unit-free).
    """
    valid = torch.isfinite(gt_points).all(-1) & torch.isfinite(composite).all(-1)
    if not valid.any():
        return [], 0
    truth = gt_points.double()
    scale = least_squares_scale(composite.double()[valid], truth[valid])
    norm = truth[valid].norm(dim=-1).mean().clamp(min=1e-12)
    owner = slot_ownership(slot_masks)  # (T, K, h, w)
    finite = torch.isfinite(slot_points).all(-1)
    scores, unscored = [], 0
    for obj in gt_ids[valid].unique().tolist():
        if obj <= 0:
            continue
        region = (gt_ids == obj) & valid
        inter = (owner & region[:, None]).sum(dim=(0, 2, 3)).double()
        union = (owner | region[:, None]).sum(dim=(0, 2, 3)).double()
        slot = int((inter / union.clamp(min=1)).argmax())
        claimed = owner[:, slot] & finite[:, slot]
        if not claimed.any():
            unscored += 1
            continue
        prediction = _subsample(scale * slot_points[:, slot][claimed].double(), max_points)
        accuracy, completeness = accuracy_completeness(
            prediction / norm, _subsample(truth[region], max_points) / norm
        )
        scores.append((accuracy, completeness))
    return scores, unscored


class ObjectReconstruction(Metric):
    """Per-object 3D reconstruction of the slots (OSRT judges object-centric 3D per object).

    For each video: one scale s = argmin Σ‖s·p − g‖² of the composite pointmap p against the
    ground truth g over every valid pixel (predictions and truth are both in the clip's
    first-camera frame, so only the scale is free). Each pixel belongs to the slot(s) whose mask
    is largest there; each ground-truth object is matched to the slot whose pixels overlap it
    best over the whole video (IoU); the slot's point cloud is s × its points on its own pixels,
    the object's cloud the true points on the object's pixels. Accuracy: mean distance from a
    predicted point to the nearest true one; completeness: the converse; Chamfer: their mean.
    Distances are divided by the video's mean true point norm. Averaged over objects.
    At most `max_points` points per cloud (evenly spaced) enter the nearest-neighbour search.

    `update(slot_points (B,T,K,h,w,3), slot_masks (B,T,K,h,w), composite (B,T,h,w,3),
    gt_points (B,T,H,W,3), gt_ids (B,T,H,W))`; the truth is resampled (nearest) to (h, w).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    accuracy_sum: Tensor
    completeness_sum: Tensor
    objects: Tensor
    videos: Tensor
    unscored: Tensor

    def __init__(self, prefix: str = "", max_points: int = 4096, **kwargs) -> None:
        super().__init__(**kwargs)
        if max_points < 1:
            raise ValueError(f"max_points must be >= 1, got {max_points}")
        self.prefix, self.max_points = prefix, max_points
        for name in ("accuracy_sum", "completeness_sum"):
            self.add_state(name, _float64(), dist_reduce_fx="sum")
        for name in ("objects", "videos", "unscored"):
            self.add_state(name, _long(), dist_reduce_fx="sum")

    def update(
        self,
        slot_points: Tensor,
        slot_masks: Tensor,
        composite: Tensor,
        gt_points: Tensor,
        gt_ids: Tensor,
    ) -> None:
        size = tuple(slot_masks.shape[-2:])
        _expect(slot_points.shape[:-1] == slot_masks.shape, "slot_points", slot_masks.shape)
        _expect(composite.shape[:-1] == slot_masks.shape[:2] + size, "composite", slot_masks.shape)
        gt_points = resize_nearest(gt_points.float(), size)
        gt_ids = resize_nearest(gt_ids, size)
        for b in range(slot_masks.shape[0]):
            scores, unscored = video_object_distances(
                slot_points[b],
                slot_masks[b],
                composite[b],
                gt_points[b],
                gt_ids[b],
                self.max_points,
            )
            self.videos += 1
            self.unscored += unscored
            for accuracy, completeness in scores:
                self.accuracy_sum += accuracy.to(self.accuracy_sum.device)
                self.completeness_sum += completeness.to(self.completeness_sum.device)
                self.objects += 1

    def compute(self) -> dict[str, float]:
        accuracy = _mean(self.accuracy_sum, self.objects)
        completeness = _mean(self.completeness_sum, self.objects)
        p = self.prefix
        return {
            f"{p}obj3d_accuracy": accuracy,
            f"{p}obj3d_completeness": completeness,
            f"{p}obj3d_chamfer": (accuracy + completeness) / 2,
            f"{p}obj3d_num_objects": float(self.objects),
            f"{p}obj3d_num_videos": float(self.videos),
            f"{p}obj3d_num_unscored": float(self.unscored),
        }


# ----------------------------------------------------------------------------------------------
# Video depth


def video_depth_errors(
    prediction: Tensor, truth: Tensor, alignment: str, max_depth: float | None = None
) -> tuple[Tensor, Tensor, int]:
    """Σ Abs Rel, Σ [δ < 1.25] and the valid pixel count of one video (TTT3R's
    `depth_evaluation`): valid where 0 < truth (< max_depth); one alignment for all frames;
    predictions clipped to max_depth after alignment; δ = max(p/g, g/p) with p >= 1e-5.

    prediction: (T, h, w) depth, resized to the truth's (T, H, W) bicubically (TTT3R: cv2 cubic).
    """
    if alignment not in DEPTH_ALIGNMENTS:
        raise ValueError(f"alignment must be one of {DEPTH_ALIGNMENTS}, got {alignment!r}")
    prediction = prediction.double()
    if prediction.shape[-2:] != truth.shape[-2:]:
        prediction = F.interpolate(prediction[:, None], size=truth.shape[-2:], mode="bicubic")
        prediction = prediction[:, 0]
    truth = truth.double()
    valid = torch.isfinite(truth) & (truth > 0) & torch.isfinite(prediction)
    if max_depth is not None:
        valid &= truth < max_depth
    p, g = prediction[valid], truth[valid]
    if p.numel() == 0:
        return _float64(), _float64(), 0
    if alignment == "scale":
        p = depth_scale(p, g) * p
    else:
        scale, shift = depth_scale_and_shift(p, g)
        p = scale * p + shift
    if max_depth is not None:
        p = p.clamp(max=max_depth)
    abs_rel = ((p - g).abs() / g).sum()
    p = p.clamp(min=1e-5)
    within = (torch.maximum(p / g, g / p) < 1.25).double().sum()
    return abs_rel, within, int(valid.sum())


class VideoDepth(Metric):
    """Video depth as TTT3R's `eval/video_depth`: per video, one alignment of all its frames'
    depths to the ground truth (`alignment="scale"`: robust L1 scale; `"scale&shift"`: L1 scale
    and shift), then Abs Rel = mean |p − g| / g and δ < 1.25 = share of pixels with
    max(p/g, g/p) < 1.25. Videos are averaged weighted by their valid pixels (as TTT3R), i.e.
    the means are over all valid pixels of all videos.

    `update(prediction (B,T,h,w), truth (B,T,H,W))`. Names: `{prefix}depth_abs_rel_{tag}`,
    `{prefix}depth_delta125_{tag}`, `{prefix}depth_num_videos_{tag}` with tag `scale` or
    `scale_shift`.
    """

    is_differentiable = False
    full_state_update = False
    abs_rel_sum: Tensor
    within_sum: Tensor
    pixels: Tensor
    videos: Tensor

    def __init__(
        self,
        alignment: str = "scale",
        *,
        prefix: str = "",
        max_depth: float | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if alignment not in DEPTH_ALIGNMENTS:
            raise ValueError(f"alignment must be one of {DEPTH_ALIGNMENTS}, got {alignment!r}")
        self.alignment, self.prefix, self.max_depth = alignment, prefix, max_depth
        self.add_state("abs_rel_sum", _float64(), dist_reduce_fx="sum")
        self.add_state("within_sum", _float64(), dist_reduce_fx="sum")
        self.add_state("pixels", _long(), dist_reduce_fx="sum")
        self.add_state("videos", _long(), dist_reduce_fx="sum")

    def update(self, prediction: Tensor, truth: Tensor) -> None:
        _expect(prediction.shape[:2] == truth.shape[:2], "prediction", truth.shape)
        for pred, true in zip(prediction, truth, strict=True):
            abs_rel, within, pixels = video_depth_errors(pred, true, self.alignment, self.max_depth)
            if pixels:
                self.abs_rel_sum += abs_rel.to(self.abs_rel_sum.device)
                self.within_sum += within.to(self.within_sum.device)
                self.pixels += pixels
                self.videos += 1

    def compute(self) -> dict[str, float]:
        tag = "scale" if self.alignment == "scale" else "scale_shift"
        p = self.prefix
        return {
            f"{p}depth_abs_rel_{tag}": _mean(self.abs_rel_sum, self.pixels),
            f"{p}depth_delta125_{tag}": _mean(self.within_sum, self.pixels),
            f"{p}depth_num_videos_{tag}": float(self.videos),
        }


# ----------------------------------------------------------------------------------------------
# Camera trajectory


def rotation_angle_degrees(rotation: Tensor) -> Tensor:
    """Angle of rotation matrices (..., 3, 3) in degrees, as atan2(sin, cos): accurate near 0,
    where arccos of the trace loses half the digits (float32 poses would read ~0.01°)."""
    cosine = (rotation.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    skew = rotation - rotation.transpose(-1, -2)
    sine = torch.stack((skew[..., 2, 1], skew[..., 0, 2], skew[..., 1, 0]), -1).norm(dim=-1) / 2
    return torch.rad2deg(torch.atan2(sine, cosine))


def trajectory_errors(prediction: Tensor, truth: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(ATE, RPE translation, RPE rotation in degrees) of one video's camera-to-world poses
    (T, 4, 4), as TTT3R's `eval/relpose` computes them with evo: the predicted camera centres
    are aligned to the true ones by Umeyama's Sim(3); ATE is the RMSE of the aligned centres'
    errors; RPE compares consecutive relative poses (frame i to i + 1, translation scaled by the
    alignment's scale), RMSE of the translation error's norm and of the rotation error's angle.

    Raises ValueError for fewer than 2 frames or a static (predicted or true) camera.
    """
    if prediction.shape[0] < 2:
        raise ValueError("camera metrics need at least 2 frames")
    pred, true = prediction.double(), truth.double()
    if not (torch.isfinite(pred).all() and torch.isfinite(true).all()):
        raise ValueError("non-finite camera poses")
    true_centres = true[:, :3, 3]
    if (true_centres - true_centres.mean(0)).norm(dim=-1).max() <= 1e-9:
        raise ValueError("the true camera is static: ATE after Sim(3) alignment is undefined")
    alignment = umeyama_sim3(pred[:, :3, 3], true_centres)
    ate = (alignment.apply(pred[:, :3, 3]) - true_centres).norm(dim=-1).square().mean().sqrt()
    pred = pred.clone()
    pred[:, :3, 3] *= alignment.scale  # the rotation and shift cancel in relative poses
    rel_pred = torch.linalg.inv(pred[:-1]) @ pred[1:]
    rel_true = torch.linalg.inv(true[:-1]) @ true[1:]
    error = torch.linalg.inv(rel_true) @ rel_pred
    rpe_trans = error[:, :3, 3].norm(dim=-1).square().mean().sqrt()
    rpe_rot = rotation_angle_degrees(error[:, :3, :3]).square().mean().sqrt()
    return ate, rpe_trans, rpe_rot


class CameraTrajectory(Metric):
    """ATE, RPE translation and RPE rotation (degrees) per video (see `trajectory_errors`),
    averaged over videos (TTT3R's average over sequences). Videos whose camera metrics are
    undefined (fewer than 2 frames, a static camera) are counted in `camera_num_skipped`.

    `update(prediction (B,T,4,4), truth (B,T,4,4))`, camera-to-world poses.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    ate_sum: Tensor
    rpe_trans_sum: Tensor
    rpe_rot_sum: Tensor
    videos: Tensor
    skipped: Tensor

    def __init__(self, prefix: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self.prefix = prefix
        for name in ("ate_sum", "rpe_trans_sum", "rpe_rot_sum"):
            self.add_state(name, _float64(), dist_reduce_fx="sum")
        self.add_state("videos", _long(), dist_reduce_fx="sum")
        self.add_state("skipped", _long(), dist_reduce_fx="sum")

    def update(self, prediction: Tensor, truth: Tensor) -> None:
        _expect(prediction.shape == truth.shape, "prediction", truth.shape)
        for pred, true in zip(prediction, truth, strict=True):
            try:
                ate, rpe_trans, rpe_rot = trajectory_errors(pred, true)
            except ValueError:
                self.skipped += 1
                continue
            self.ate_sum += ate.to(self.ate_sum.device)
            self.rpe_trans_sum += rpe_trans.to(self.ate_sum.device)
            self.rpe_rot_sum += rpe_rot.to(self.ate_sum.device)
            self.videos += 1

    def compute(self) -> dict[str, float]:
        p = self.prefix
        return {
            f"{p}camera_ate": _mean(self.ate_sum, self.videos),
            f"{p}camera_rpe_trans": _mean(self.rpe_trans_sum, self.videos),
            f"{p}camera_rpe_rot": _mean(self.rpe_rot_sum, self.videos),
            f"{p}camera_num_videos": float(self.videos),
            f"{p}camera_num_skipped": float(self.skipped),
        }


def _expect(condition: bool, name: str, reference: torch.Size) -> None:
    if not condition:
        raise ValueError(f"{name} does not match the layout of {tuple(reference)}")
