"""Coordinate frames, nearest resizing, and 3D accuracy of the per-slot pointmaps."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from post3r_train.batch import Batch
from post3r_train.teacher import TeacherOutput


def first_camera_transform(camera_to_world: Tensor) -> Tensor:
    """World-to-first-camera (B, 4, 4) of a clip's poses (B, T, 4, 4)."""
    return torch.linalg.inv(camera_to_world[:, 0].double()).to(camera_to_world.dtype)


def transform_points(points: Tensor, transform: Tensor) -> Tensor:
    """Apply (B, 4, 4) to points (B, T, H, W, 3); non-finite points stay non-finite."""
    rotation, translation = transform[:, :3, :3], transform[:, :3, 3]
    moved = torch.einsum("bij,bthwj->bthwi", rotation, points)
    return moved + translation[:, None, None, None, :]


def transform_frames(points: Tensor, transform: Tensor) -> Tensor:
    """Apply per-frame (B, T, 4, 4) transforms to points (B, T, ..., 3)."""
    rotation, translation = transform[..., :3, :3], transform[..., :3, 3]
    flat = points.flatten(2, -2)  # (B, T, P, 3)
    moved = torch.einsum("btij,btpj->btpi", rotation, flat) + translation[:, :, None]
    return moved.view(points.shape)


def to_first_camera(teacher: TeacherOutput, transform: Tensor | None = None) -> TeacherOutput:
    """Express points and poses in the clip's first camera frame (OpenCV axes), the frame TTT3R
    predicts in: frame 0's pose becomes the identity, whichever teacher produced them. A given
    world-to-frame `transform` (B, 4, 4) is used instead (a stream keeps its first clip's)."""
    if transform is None:
        transform = first_camera_transform(teacher.camera_to_world)
    points = teacher.pointmap
    if points is not None:
        points = transform_points(points, transform)
    poses = transform[:, None] @ teacher.camera_to_world
    return teacher._replace(pointmap=points, camera_to_world=poses)


class PointErrors(NamedTuple):
    """Relative 3D errors (distance / mean ground-truth point norm) after scale alignment.

    object_error: one value per ground-truth object (its matched slot's points on its pixels);
    scene_error: one value per video (the composite pointmap on every valid pixel). The weights
    are the matching sample counts (1 each), ready for torchmetrics' MeanMetric."""

    object_error: Tensor
    object_weight: Tensor
    scene_error: Tensor
    scene_weight: Tensor


def object_point_errors(
    pointmap: Tensor, slot_pointmaps: Tensor, masks: Tensor, batch: Batch
) -> PointErrors:
    """3D accuracy of a composite `pointmap` (B, T, h, w, 3), per-slot `slot_pointmaps`
    (B, T, K, h, w, 3) and pointmap-decoder `masks` (B, T, K, h, w), all in the clip's first
    camera frame, against the batch's ground truth (`pointmap`, `segmentations`, and
    `camera_to_world` to move it into the first camera frame) at the decoder's resolution.

    Each video gets one scale s = argmin Σ‖s·p − g‖² over its valid pixels. Each ground-truth
    object is matched to the slot whose pointmap-decoder mask overlaps it best (video IoU); its
    error is the mean distance between that slot's own points and the true points on the
    object's pixels.
    """
    masks = masks.float()
    size = tuple(masks.shape[-2:])
    truth = batch["pointmap"].float()
    if "camera_to_world" in batch:
        truth = transform_points(truth, first_camera_transform(batch["camera_to_world"].float()))
    truth = resize_nearest(truth.movedim(-1, 2), size).movedim(2, -1)  # (B, T, h, w, 3)
    ids = resize_nearest(batch["segmentations"][:, :, None].float(), size)[:, :, 0].long()
    valid = torch.isfinite(truth).all(-1)
    truth = truth.nan_to_num(0.0, posinf=0.0, neginf=0.0)
    composite, slot_points = pointmap.float(), slot_pointmaps.float()
    object_errors, scene_errors = [], []
    for b in range(masks.shape[0]):
        v = valid[b]
        if not v.any():
            continue
        g, p = truth[b][v], composite[b][v]
        scale = (p * g).sum() / (p * p).sum().clamp(min=1e-12)
        norm = g.norm(dim=-1).mean().clamp(min=1e-12)
        scene_errors.append((scale * p - g).norm(dim=-1).mean() / norm)
        hard = F.one_hot(masks[b].argmax(1), masks.shape[2]).movedim(-1, 1).bool()  # (T,K,h,w)
        for obj in ids[b].unique():
            if obj <= 0:
                continue
            region = (ids[b] == obj) & v  # (T, h, w)
            if not region.any():
                continue
            inter = (hard & region[:, None]).flatten(2).sum((0, 2)).float()
            union = (hard | region[:, None]).flatten(2).sum((0, 2)).float()
            slot = int((inter / union.clamp(min=1)).argmax())
            pred = slot_points[b][:, slot][region]
            error = (scale * pred - truth[b][region]).norm(dim=-1).mean() / norm
            object_errors.append(error)
    return PointErrors(*_with_weights(object_errors, masks), *_with_weights(scene_errors, masks))


def _with_weights(values: list[Tensor], like: Tensor) -> tuple[Tensor, Tensor]:
    if not values:
        empty = like.new_zeros(0)
        return empty, empty
    stacked = torch.stack(values)
    return stacked, torch.ones_like(stacked)


def resize_nearest(x: Tensor, size: tuple[int, ...]) -> Tensor:
    """(B, T, C, H, W) -> (B, T, C, h, w) by nearest sampling (keeps points on their surface
    and instance ids whole); float, or `x` itself at the right size already."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    flat = F.interpolate(x.flatten(0, 1).float(), size=tuple(size), mode="nearest-exact")
    return flat.unflatten(0, x.shape[:2])
