"""The 3D evaluation of a POST3R model's outputs against ground-truth geometry (synthetic
shards): which output feeds which `metrics3d` metric, and the two baselines scored by the same
code on the same videos.

Variants measured (metric name prefixes):
- the model (no prefix): its slots' point clouds and masks, its composite pointmap's depth, the
  camera poses it used (the teacher's, or the ground truth's with `model.teacher.name=dataset`);
- `baseline_composite_`: every slot owns every pixel and predicts the model's composite
  pointmap (the model's geometry without object separation);
- `baseline_plane_`: the model's slot masks, but every slot (and the composite) predicts a
  plane at one constant depth (the median of the model's composite depth in the video) in front
  of each camera, placed by the same poses (object separation without geometry; needs the
  shards' intrinsics).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection

from post3r_train.geometry import first_camera_transform, transform_frames, transform_points
from post3r_train.metrics3d import CameraTrajectory, ObjectReconstruction, VideoDepth

if TYPE_CHECKING:  # the model module imports this one (through post3r_train.metrics)
    from post3r_train.model import PointmapOutput

BASELINES = ("baseline_composite_", "baseline_plane_")


class Geometry3D(NamedTuple):
    """One variant's 3D prediction of a clip, in the clip's first-camera frame."""

    composite: Tensor  # (B, T, h, w, 3)
    slot_points: Tensor  # (B, T, K, h, w, 3)
    slot_masks: Tensor  # (B, T, K, h, w)
    camera_to_world: Tensor  # (B, T, 4, 4), the poses that placed the points


def make_3d_metrics() -> dict[str, Metric]:
    """Fresh metrics for the model and both baselines, keyed by their collection names."""
    metrics: dict[str, Metric] = {}
    for prefix in ("", *BASELINES):
        metrics[f"{prefix}obj3d"] = ObjectReconstruction(prefix=prefix)
        metrics[f"{prefix}depth_scale"] = VideoDepth("scale", prefix=prefix)
        metrics[f"{prefix}depth_scale_shift"] = VideoDepth("scale&shift", prefix=prefix)
    metrics["camera"] = CameraTrajectory()
    return metrics


def has_3d_truth(batch: Mapping) -> bool:
    """Whether the batch carries what the 3D metrics compare against."""
    return all(key in batch for key in ("pointmap", "segmentations", "camera_to_world", "depth"))


def update_3d_metrics(
    metrics: MetricCollection | Mapping[str, Metric], out: PointmapOutput, batch: Mapping
) -> None:
    """Update every 3D metric in `metrics` (from `make_3d_metrics`) with one validation batch:
    the pointmap decoder's output `out` against `batch`'s ground truth (`has_3d_truth`, plus
    `intrinsics` for the plane baseline), moved into the clip's first-camera frame.
    """
    poses = batch["camera_to_world"].double()
    truth = transform_points(batch["pointmap"].double(), first_camera_transform(poses))
    true_poses = first_camera_transform(poses)[:, None] @ poses
    variants = {"": model_geometry(out), "baseline_composite_": composite_baseline(out)}
    if "intrinsics" in batch:
        variants["baseline_plane_"] = plane_baseline(out, batch["intrinsics"], batch["depth"])
    for prefix, geometry in variants.items():
        metrics[f"{prefix}obj3d"].update(
            geometry.slot_points,
            geometry.slot_masks,
            geometry.composite,
            truth,
            batch["segmentations"],
        )
        depth = camera_depth(geometry.composite, geometry.camera_to_world)
        metrics[f"{prefix}depth_scale"].update(depth, batch["depth"])
        metrics[f"{prefix}depth_scale_shift"].update(depth, batch["depth"])
    metrics["camera"].update(out.camera_to_world.double(), true_poses)


def model_geometry(out: PointmapOutput) -> Geometry3D:
    return Geometry3D(
        out.pointmap.double(),
        out.slot_pointmaps.double(),
        out.masks.float(),
        out.camera_to_world.double(),
    )


def composite_baseline(out: PointmapOutput) -> Geometry3D:
    """Every slot predicts the whole composite pointmap and owns every pixel."""
    model = model_geometry(out)
    num_slots = model.slot_masks.shape[2]
    slot_points = model.composite[:, :, None].expand(-1, -1, num_slots, -1, -1, -1)
    return model._replace(slot_points=slot_points, slot_masks=torch.ones_like(model.slot_masks))


def plane_baseline(out: PointmapOutput, intrinsics: Tensor, true_depth: Tensor) -> Geometry3D:
    """The model's masks; every pixel of a video at one depth in its camera, the median depth
    of the model's composite in that video (so the plane lives in the poses' scale, which the
    alignments then fit like the model's), placed in the first-camera frame by the model's
    poses. `intrinsics` (B, T, 3, 3) belong to the frames of size `true_depth`'s (H, W)."""
    model = model_geometry(out)
    size = model.slot_masks.shape[-2:]
    rays = pixel_rays(intrinsics.double(), tuple(true_depth.shape[-2:]), tuple(size))
    depth = camera_depth(model.composite, model.camera_to_world).flatten(1).nanmedian(dim=1)
    plane = transform_frames(depth.values[:, None, None, None, None] * rays, model.camera_to_world)
    num_slots = model.slot_masks.shape[2]
    slot_points = plane[:, :, None].expand(-1, -1, num_slots, -1, -1, -1)
    return model._replace(composite=plane, slot_points=slot_points)


def pixel_rays(intrinsics: Tensor, frame_size: tuple[int, ...], size: tuple[int, ...]) -> Tensor:
    """Camera-frame points at depth 1 (z = 1) through the pixel centres of a (h, w) grid
    covering frames of `frame_size` whose pinhole intrinsics (B, T, 3, 3) use integer pixel
    centres (OpenCV): (B, T, h, w, 3)."""
    (height, width), (h, w) = frame_size, size
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) * height / h - 0.5
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) * width / w - 0.5
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    pixels = torch.stack((xx, yy, torch.ones_like(xx)), dim=-1).to(intrinsics.device)
    return torch.einsum("btij,hwj->bthwi", torch.linalg.inv(intrinsics), pixels)


def camera_depth(points: Tensor, camera_to_world: Tensor) -> Tensor:
    """Depth (camera-frame z) of first-camera-frame points (B, T, h, w, 3): (B, T, h, w)."""
    return transform_frames(points.double(), torch.linalg.inv(camera_to_world.double()))[..., 2]
