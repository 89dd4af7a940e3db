"""Decoding shard samples into videos, cutting clips, cropping and resizing.

A decoded video holds read-only views of the sample's bytes, or lazy `NpyMember`s for local
shards; cutting a clip reads and copies only the frames and the crop window it needs. Resizing
happens last: frames with antialiased bilinear filtering, label ids, depth and pointmaps with
nearest-neighbour sampling (no blending across object boundaries), intrinsics rescaled to match.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from post3r_data.errors import CorruptSampleError
from post3r_data.shards import NpyMember, TarMember, decode_npy
from post3r_data.teacher_cache import TEACHER_FIELDS, crop_indices

OPTIONAL_FIELDS = ("segmentations", "pointmap", "depth", "camera_to_world", "intrinsics")
_PER_PIXEL = ("segmentations", "pointmap", "depth")


@dataclass
class Video:
    """One decoded sample: `video` uint8 (T, H, W, 3) and optional per-frame arrays, as arrays
    or as `NpyMember`s that read only the frames a clip takes."""

    key: str
    video: np.ndarray | NpyMember
    extra: dict[str, np.ndarray | NpyMember] = field(default_factory=dict)
    # Cached teacher maps of the whole frames (post3r_data.teacher_cache), when a cache is read.
    teacher: dict[str, np.ndarray | NpyMember] | None = None

    @property
    def num_frames(self) -> int:
        return self.video.shape[0]


@dataclass
class Clip:
    """Frames [start, start + T) of a video, cropped to `box` = (top, left, height, width)."""

    key: str
    frame_index: np.ndarray  # (T,) int64
    box: tuple[int, int, int, int]
    video: np.ndarray  # (T, h, w, 3) uint8, already cropped
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # cropped likewise
    frame_hw: tuple[int, int] = (0, 0)  # the whole frame's size, which `box` lies in
    teacher: dict[str, np.ndarray] | None = None  # cached maps of the whole frames, not cropped


def instance_ids(segmentations: np.ndarray) -> np.ndarray:
    """(T, H, W) instance ids, 0 = background, from any supported mask layout.

    - (T, H, W) or (T, H, W, 1): already an id map (ours, SlotContrast's MOVi).
    - (T, H, W, I) with I > 1: SlotContrast's YT-VIS layout, one channel per instance whose
      value is the category id; instance i becomes id i + 1. Pixels claimed by two or more
      instances become 0, which is what SlotContrast's `ignore_overlaps` does for FG-ARI.

    A YT-VIS video with a single instance is stored as one channel and therefore reads as an
    id map whose id is the category id; the partition into objects is the same.
    """
    if segmentations.ndim == 3:
        return segmentations
    if segmentations.shape[-1] == 1:
        return segmentations[..., 0]
    channels = segmentations.shape[-1]
    ids = np.zeros(segmentations.shape[:-1], np.uint8 if channels < 256 else np.int32)
    claims = np.zeros(segmentations.shape[:-1], np.int32)
    for channel in range(channels):  # a loop over few channels beats reductions over the last axis
        present = segmentations[..., channel] != 0
        claims += present
        ids[present] = channel + 1
    ids[claims > 1] = 0
    return ids


def _expect(condition: bool, key: str, source: str, message: str) -> None:
    if not condition:
        raise CorruptSampleError(f"sample {key!r} in {source}: {message}")


def decode_video(sample: dict, fields: tuple[str, ...]) -> Video:
    """Decode and validate `video.npy` and the requested optional fields of a raw sample."""
    key, source = sample.get("__key__", "?"), sample.get("__url__", "?")
    arrays = {}
    for name in ("video", *fields):
        data = sample.get(f"{name}.npy")
        _expect(data is not None, key, source, f"has no {name}.npy")
        assert data is not None  # _expect raised otherwise
        try:
            arrays[name] = NpyMember(data) if isinstance(data, TarMember) else decode_npy(data)
        except ValueError as error:
            raise CorruptSampleError(f"sample {key!r} in {source}: {name}.npy: {error}") from None
    video = arrays.pop("video")
    _expect(
        video.ndim == 4 and video.shape[-1] == 3 and video.dtype == np.uint8,
        key,
        source,
        f"video.npy must be uint8 (T, H, W, 3), got {video.dtype} {video.shape}",
    )
    frames = video.shape[:3]
    shapes = {
        "segmentations": (frames, (3, 4)),
        "pointmap": ((*frames, 3), (4,)),
        "depth": (frames, (3,)),
        "camera_to_world": ((frames[0], 4, 4), (3,)),
    }
    for name, array in arrays.items():
        if name == "intrinsics":
            if array.shape == (3, 3):
                arrays[name] = array = np.broadcast_to(np.asarray(array), (frames[0], 3, 3))
            _expect(array.shape == (frames[0], 3, 3), key, source, f"intrinsics {array.shape}")
            continue
        expected, ndims = shapes[name]
        _expect(
            array.ndim in ndims and array.shape[: len(expected)] == expected,
            key,
            source,
            f"{name}.npy has shape {array.shape}, expected {expected} to match video {video.shape}",
        )
    teacher = _decode_teacher(sample, key, source, frames[0])
    if "segmentations" in arrays:
        _expect(
            np.issubdtype(arrays["segmentations"].dtype, np.integer),
            key,
            source,
            f"segmentations must be integer ids, got {arrays['segmentations'].dtype}",
        )
    return Video(key=key, video=video, extra=arrays, teacher=teacher)


def _decode_teacher(sample: dict, key: str, source: str, num_frames: int) -> dict | None:
    """The sidecar teacher arrays merged into a sample (see loader.read_samples), checked."""
    if "teacher_pointmap.npy" not in sample:
        return None
    arrays = {}
    for name in TEACHER_FIELDS:
        data = sample.get(f"{name}.npy")
        _expect(data is not None, key, source, f"its teacher cache entry has no {name}.npy")
        assert data is not None  # _expect raised otherwise
        try:
            arrays[name] = NpyMember(data) if isinstance(data, TarMember) else decode_npy(data)
        except ValueError as error:
            raise CorruptSampleError(f"sample {key!r} teacher cache {name}: {error}") from None
    points, confidence = arrays["teacher_pointmap"], arrays["teacher_confidence"]
    poses = arrays["teacher_camera_to_world"]
    _expect(
        points.ndim == 4
        and points.shape[0] == num_frames
        and points.shape[-1] == 3
        and tuple(confidence.shape) == tuple(points.shape[:3])
        and tuple(poses.shape) == (num_frames, 4, 4),
        key,
        source,
        f"teacher cache arrays {points.shape}, {confidence.shape}, {poses.shape} do not match "
        f"the video's {num_frames} frames; rebuild the cache (uv run apps/cache-teacher)",
    )
    return arrays


def crop_window(height: int, width: int, out_hw: tuple[int, int], scale: float) -> tuple[int, int]:
    """Size of a crop with the output's aspect ratio: `scale` times the largest that fits."""
    out_h, out_w = out_hw
    if width * out_h >= height * out_w:
        crop_h, crop_w = float(height), height * out_w / out_h
    else:
        crop_h, crop_w = width * out_h / out_w, width
    return max(1, min(height, round(crop_h * scale))), max(1, min(width, round(crop_w * scale)))


def cut_clip(
    video: Video, start: int, length: int, top: int, left: int, size: tuple[int, int]
) -> Clip:
    """Copy frames [start, start + length) inside the window (top, left, *size)."""
    rows, cols = slice(top, top + size[0]), slice(left, left + size[1])
    frames = slice(start, start + length)  # first, so lazy arrays read only these frames
    extra = {}
    for name, array in video.extra.items():
        if name == "segmentations":
            extra[name] = instance_ids(array[frames][:, rows, cols]).copy()
        elif name in _PER_PIXEL:
            extra[name] = array[frames][:, rows, cols].copy()
        elif name == "intrinsics":
            k = np.array(array[frames], dtype=np.float64)
            k[:, 0, 2] -= left
            k[:, 1, 2] -= top
            extra[name] = k
        else:
            extra[name] = np.array(array[frames])
    teacher = None
    if video.teacher is not None:  # whole stored frames: they are small, the crop comes later
        teacher = {name: np.array(array[frames]) for name, array in video.teacher.items()}
    return Clip(
        key=video.key,
        frame_index=np.arange(start, start + length, dtype=np.int64),
        box=(top, left, *size),
        video=video.video[frames][:, rows, cols].copy(),
        extra=extra,
        frame_hw=tuple(video.video.shape[1:3]),
        teacher=teacher,
    )


def random_clip(
    video: Video,
    rng: np.random.Generator,
    length: int,
    out_hw: tuple[int, int],
    crop_scale: tuple[float, float],
) -> Clip:
    """A clip at a random start with a random crop (same window for every frame)."""
    height, width = video.video.shape[1:3]
    start = int(rng.integers(0, video.num_frames - length + 1))
    size = crop_window(height, width, out_hw, float(rng.uniform(*crop_scale)))
    top = int(rng.integers(0, height - size[0] + 1))
    left = int(rng.integers(0, width - size[1] + 1))
    return cut_clip(video, start, length, top, left, size)


def central_clips(video: Video, length: int | None, out_hw: tuple[int, int]) -> list[Clip]:
    """The whole video (length None) or all consecutive `length`-frame chunks (the remainder is
    dropped), centre-cropped to the output's aspect ratio."""
    height, width = video.video.shape[1:3]
    size = crop_window(height, width, out_hw, 1.0)
    top, left = (height - size[0]) // 2, (width - size[1]) // 2
    length = video.num_frames if length is None else length
    starts = range(0, video.num_frames - length + 1, length)
    return [cut_clip(video, s, length, top, left, size) for s in starts]


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """Source index of each output pixel for nearest-neighbour resizing (pixel centres)."""
    return np.minimum(
        ((np.arange(size_out) + 0.5) * (size_in / size_out)).astype(np.int64), size_in - 1
    )


def _frames_array(clip: Clip, out_hw: tuple[int, int], as_uint8: bool) -> np.ndarray:
    """(T, 3, H, W) frames, uint8 or float32 in [0, 1]; only resizing uses torch."""
    frames = clip.video.transpose(0, 3, 1, 2)
    if clip.box[2:] == out_hw:
        frames = np.ascontiguousarray(frames)
        return frames if as_uint8 else np.divide(frames, np.float32(255), dtype=np.float32)
    scaled = torch.from_numpy(np.divide(frames, np.float32(255), dtype=np.float32))
    scaled = F.interpolate(scaled, size=out_hw, mode="bilinear", antialias=True).clamp_(0, 1)
    return scaled.mul_(255).round_().to(torch.uint8).numpy() if as_uint8 else scaled.numpy()


def finish_clip(
    clip: Clip,
    out_hw: tuple[int, int],
    frames_dtype: torch.dtype,
    teacher_hw: tuple[int, int] | None = None,
) -> dict:
    """Resize a clip to `out_hw`: NumPy arrays in batch layout without the batch axis.

    Cached teacher maps (if the clip has them) are resampled to `teacher_hw` (nearest) over the
    same crop as the frames, mapped from frame pixels onto the stored maps' grid.

    Per-clip work stays in NumPy (single-threaded) rather than small torch ops: in a busy
    main process (num_workers=0) each of those can stall on torch's thread pool.
    """
    out_h, out_w = out_hw
    _, _, crop_h, crop_w = clip.box
    resize = (crop_h, crop_w) != (out_h, out_w)
    out = {
        "frames": _frames_array(clip, out_hw, as_uint8=frames_dtype == torch.uint8),
        "key": clip.key,
        "frame_index": clip.frame_index,
    }
    rows, cols = nearest_indices(crop_h, out_h), nearest_indices(crop_w, out_w)
    for name, array in clip.extra.items():
        if name in _PER_PIXEL:
            array = array[:, rows][:, :, cols] if resize else array
            out[name] = array.astype(np.int64 if name == "segmentations" else np.float32)
        elif name == "intrinsics":
            k = array.copy()
            sx, sy = out_w / crop_w, out_h / crop_h
            k[:, 0, 0] *= sx
            k[:, 1, 1] *= sy
            k[:, 0, 1] *= sx
            k[:, 0, 2] = (k[:, 0, 2] + 0.5) * sx - 0.5
            k[:, 1, 2] = (k[:, 1, 2] + 0.5) * sy - 0.5
            out[name] = k.astype(np.float32)
        else:
            out[name] = array.astype(np.float32)
    if clip.teacher is not None:
        out.update(_teacher_maps(clip, teacher_hw))
    return out


def _teacher_maps(clip: Clip, teacher_hw: tuple[int, int] | None) -> dict[str, np.ndarray]:
    if teacher_hw is None:
        raise ValueError("a clip with cached teacher maps needs teacher_hw (their output size)")
    assert clip.teacher is not None  # the caller checked
    points = clip.teacher["teacher_pointmap"]
    rows, cols = crop_indices(clip.box, clip.frame_hw, points.shape[1:3], teacher_hw)
    return {
        "teacher_pointmap": points[:, rows][:, :, cols].astype(np.float32),
        "teacher_confidence": clip.teacher["teacher_confidence"][:, rows][:, :, cols].astype(
            np.float32
        ),
        "teacher_camera_to_world": clip.teacher["teacher_camera_to_world"].astype(np.float32),
    }


def collate(samples: list[dict], frames_dtype: torch.dtype = torch.float32) -> dict:
    """Stack finished clips into a batch of tensors; `key` becomes a list of video ids."""
    batch: dict = {"key": [s["key"] for s in samples]}
    for name in samples[0]:
        if name == "key":
            continue
        shapes = sorted({s[name].shape for s in samples})
        if len(shapes) > 1:
            raise ValueError(
                f"cannot batch {name} of different shapes {shapes} (videos {batch['key']}): "
                "whole validation videos differ in length; use batch_size=1 or a chunk_size"
            )
        batch[name] = torch.from_numpy(np.stack([s[name] for s in samples]))
    if batch["frames"].dtype != frames_dtype:  # float16, bfloat16, float64
        batch["frames"] = batch["frames"].to(frames_dtype)
    return batch
