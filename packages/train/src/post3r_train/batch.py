"""The batch a POST3R model takes: what the data loaders yield, typed.

B videos of T frames of H x W pixels. Only `frames` is required; the others come with the shards
that have them (ground-truth segmentations, and the synthetic shards' 3D truth).
"""

from __future__ import annotations

from typing import Any, TypedDict

from torch import Tensor


class Batch(TypedDict, total=False):
    """frames: (B, T, 3, H, W), float in [0, 1] or uint8. segmentations: (B, T, H, W) instance
    ids, 0 = background. pointmap: (B, T, H, W, 3) world points. camera_to_world: (B, T, 4, 4).
    depth: (B, T, H, W) camera-frame z; intrinsics: (B, T, 3, 3) (synthetic shards).
    teacher_*: the cached teacher's maps at the decoder's resolution (h, w) (pointmap
    (B, T, h, w, 3), confidence (B, T, h, w), camera_to_world (B, T, 4, 4)), with
    `model.teacher.name=cached`. Sample keys (`__key__`, ...) name the videos in errors."""

    frames: Tensor
    segmentations: Tensor
    pointmap: Tensor
    camera_to_world: Tensor
    depth: Tensor
    intrinsics: Tensor
    teacher_pointmap: Tensor
    teacher_confidence: Tensor
    teacher_camera_to_world: Tensor
    __key__: Any
