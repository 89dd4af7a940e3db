"""Synthetic 3D video: procedural scenes, rendered to shards with masks and geometry.

Each video shows 3-6 upright objects (spheres, boxes, cylinders) with distinct saturated colours
and simple textures on a grey checkered ground, objects that slide and spin, and a camera that
orbits while looking down at them. Per frame it stores RGB, instance ids, depth, the world
pointmap, the camera-to-world pose and the intrinsics (OpenCV camera axes).

CLI: `uv run apps/synth --output DIR --videos N [--size 128] [--frames 8] [--seed S]`.
"""

from __future__ import annotations

import colorsys
import json
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from post3r_data.render import (
    BOX,
    CHECKER,
    PATTERN_NAMES,
    SHAPE_NAMES,
    SOLID,
    SPHERE,
    STRIPES,
    SceneBatch,
    render,
)
from post3r_data.shards import (
    ShardSummary,
    canonical_split,
    encode_npy,
    ordered_map,
    plan_shards,
    prepare_output_dir,
    summarize_shards,
    write_json_atomic,
    write_shard,
)

DATASET = "synthetic"
MAX_SIZE = 4096  # pixels per side: beyond it one frame alone needs gigabytes
_SPLIT_CODES = {"train": 0, "validation": 1}
_ARENA_RADIUS = 2.2  # object centres start inside this disc around the origin
_MARGIN = 0.1  # minimum gap between object bounding circles at every frame
_MAX_SPEED = 0.05  # world units per frame at object_motion = 1
_MAX_SPIN = 0.08  # radians per frame at object_motion = 1
_CAMERA_DISTANCE = (4.5, 8.0)  # from the point looked at
_MAX_TARGET_DRIFT = 1.0  # of the point looked at, from the arena's centre
_PLACEMENT_ROUNDS = 8  # an object that does not fit shrinks by 15 % up to 7 times
_RAYS_PER_RENDER = 2**18  # videos are traced in groups of about this many rays


@dataclass(frozen=True)
class SynthConfig:
    """Difficulty knobs. The defaults give a scene a slot model learns quickly."""

    min_objects: int = 3
    max_objects: int = 6
    shapes: tuple[str, ...] = SHAPE_NAMES
    textures: bool = True  # stripes and checkers on objects (False: plain colours)
    texture_contrast: float = 0.35
    object_motion: float = 1.0  # scales object speed and spin; 0 = static objects
    camera_motion: float = 1.0  # scales the camera's orbit speed; 0 = static camera
    shadows: bool = True
    random_lighting: bool = True  # random light direction and ambient level per video
    fov_degrees: float = 50.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= 8:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= 8, got "
                f"{self.min_objects}..{self.max_objects}"
            )
        unknown = set(self.shapes) - set(SHAPE_NAMES)
        if unknown or not self.shapes:
            raise ValueError(
                f"shapes must be a non-empty subset of {SHAPE_NAMES}, got {self.shapes}"
            )
        if not 20.0 <= self.fov_degrees <= 80.0:
            raise ValueError(f"fov_degrees must be within [20, 80], got {self.fov_degrees}")
        if self.object_motion < 0 or self.camera_motion < 0:
            raise ValueError("object_motion and camera_motion must be >= 0")
        if not 0.0 <= self.texture_contrast <= 1.0:
            raise ValueError(f"texture_contrast must be within [0, 1], got {self.texture_contrast}")


@dataclass
class _Object:
    shape: int
    half: tuple[float, float, float]
    position: np.ndarray  # (2,) ground position at frame 0
    velocity: np.ndarray  # (2,) per frame
    yaw: float
    spin: float
    color: tuple[float, float, float]
    pattern: int
    frequency: float

    @property
    def bound(self) -> float:
        """Radius of the object's footprint circle."""
        hx, hy, _ = self.half
        return math.hypot(hx, hy) if self.shape == BOX else hx


@dataclass
class _Scene:
    objects: list[_Object]
    cam_to_world: np.ndarray  # (T, 4, 4) float32
    ground_colors: np.ndarray  # (2, 3)
    ground_tile: float
    light: np.ndarray  # (3,)
    ambient: float


def _sample_half(shape: int, rng: np.random.Generator) -> tuple[float, float, float]:
    if shape == SPHERE:
        r = rng.uniform(0.45, 0.75)
        return (r, r, r)
    if shape == BOX:
        return (rng.uniform(0.35, 0.6), rng.uniform(0.35, 0.6), rng.uniform(0.3, 0.65))
    r = rng.uniform(0.35, 0.6)
    return (r, r, rng.uniform(0.35, 0.8))


def _fits(candidate: _Object, placed: list[_Object], frames: np.ndarray) -> bool:
    """No overlap with placed objects and within the arena, at every frame."""
    path = candidate.position + frames[:, None] * candidate.velocity
    if np.any(np.linalg.norm(path, axis=1) > _ARENA_RADIUS + 0.6 - candidate.bound):
        return False
    for other in placed:
        other_path = other.position + frames[:, None] * other.velocity
        gap = np.linalg.norm(path - other_path, axis=1) - candidate.bound - other.bound
        if np.any(gap < _MARGIN):
            return False
    return True


def _distinct_colors(n: int, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """Saturated colours with evenly spread, randomly rotated hues."""
    offset = rng.uniform()
    hues = (offset + (np.arange(n) + rng.uniform(-0.2, 0.2, n)) / n) % 1.0
    hues = rng.permutation(hues)
    return [colorsys.hsv_to_rgb(h, rng.uniform(0.6, 0.95), rng.uniform(0.75, 1.0)) for h in hues]


def _place_objects(rng: np.random.Generator, config: SynthConfig, frames: int) -> list[_Object]:
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    shapes = [SHAPE_NAMES.index(s) for s in config.shapes]
    patterns = [SOLID, STRIPES, CHECKER] if config.textures else [SOLID]
    times = np.arange(frames, dtype=np.float64)
    placed: list[_Object] = []
    for color in _distinct_colors(count, rng):
        shape = int(rng.choice(shapes))
        half = _sample_half(shape, rng)
        # 100 tries moving, 100 static; then the object shrinks (crowded scenes of 7-8
        # objects), so a scene always has the number of objects drawn.
        for attempt in range(_PLACEMENT_ROUNDS * 200):
            if attempt and attempt % 200 == 0:
                half = (0.85 * half[0], 0.85 * half[1], 0.85 * half[2])
            moving = attempt % 200 < 100
            speed = rng.uniform(0, _MAX_SPEED * config.object_motion) if moving else 0.0
            heading = rng.uniform(0, 2 * np.pi)
            candidate = _Object(
                shape=shape,
                half=half,
                position=rng.uniform(-_ARENA_RADIUS, _ARENA_RADIUS, 2),
                velocity=speed * np.array([math.cos(heading), math.sin(heading)]),
                yaw=rng.uniform(0, 2 * np.pi),
                spin=rng.uniform(-_MAX_SPIN, _MAX_SPIN) * config.object_motion,
                color=color,
                pattern=int(rng.choice(patterns)),
                frequency=rng.uniform(2.0, 4.0),
            )
            if _fits(candidate, placed, times):
                placed.append(candidate)
                break
        else:
            raise ValueError(
                f"cannot place {count} objects that keep apart over {frames} frames; "
                "lower max_objects, object_motion or the number of frames"
            )
    return placed


def _look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Camera-to-world (4, 4) with OpenCV axes: x right, y down, z towards the target."""
    forward = target - eye
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, down, forward, eye
    return pose


def _camera_path(rng: np.random.Generator, config: SynthConfig, frames: int) -> np.ndarray:
    """An orbit around the arena: azimuth, elevation, distance and target drift linearly."""
    motion = config.camera_motion
    # Every ray must hit the ground: the top of the view stays below the horizon.
    min_elevation = math.radians(config.fov_degrees / 2 + 10)
    max_elevation = math.radians(70)
    elevation0 = rng.uniform(
        max(math.radians(40), min_elevation), max(min_elevation, math.radians(60))
    )
    azimuth0 = rng.uniform(0, 2 * np.pi)
    distance0 = rng.uniform(5.2, 6.5)
    target0 = np.array([rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), 0.2])
    azimuth_rate = rng.uniform(-1, 1) * math.radians(3.0) * motion
    elevation_rate = rng.uniform(-1, 1) * math.radians(0.6) * motion
    distance_rate = rng.uniform(-1, 1) * 0.05 * motion
    target_rate = np.array([rng.uniform(-1, 1), rng.uniform(-1, 1), 0.0]) * 0.03 * motion
    poses = []
    for t in range(frames):
        elevation = np.clip(elevation0 + t * elevation_rate, min_elevation, max_elevation)
        azimuth = azimuth0 + t * azimuth_rate
        # Bounds that only long videos (over 13 frames) reach: the camera stays outside the
        # arena and keeps looking at it.
        distance = np.clip(distance0 + t * distance_rate, *_CAMERA_DISTANCE)
        target = target0 + t * target_rate
        drift = math.hypot(target[0], target[1])
        if drift > _MAX_TARGET_DRIFT:
            target[:2] *= _MAX_TARGET_DRIFT / drift
        offset = np.array(
            [
                math.cos(elevation) * math.cos(azimuth),
                math.cos(elevation) * math.sin(azimuth),
                math.sin(elevation),
            ]
        )
        poses.append(_look_at(target + distance * offset, target))
    return np.stack(poses).astype(np.float32)


def _lighting(rng: np.random.Generator, config: SynthConfig) -> tuple[np.ndarray, float]:
    if config.random_lighting:
        azimuth, elevation = (
            rng.uniform(0, 2 * np.pi),
            rng.uniform(math.radians(35), math.radians(70)),
        )
        ambient = rng.uniform(0.3, 0.45)
    else:
        azimuth, elevation, ambient = math.radians(45), math.radians(60), 0.4
    light = np.array(
        [
            math.cos(elevation) * math.cos(azimuth),
            math.cos(elevation) * math.sin(azimuth),
            math.sin(elevation),
        ]
    )
    return light, ambient


def _sample_scene(seed: int, split: str, index: int, frames: int, config: SynthConfig) -> _Scene:
    """One scene, a pure function of (seed, split, index, frames, config)."""
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    objects = _place_objects(rng, config, frames)
    cam_to_world = _camera_path(rng, config, frames)
    ground_hue = rng.uniform()
    base = np.array(colorsys.hsv_to_rgb(ground_hue, rng.uniform(0.05, 0.2), rng.uniform(0.3, 0.45)))
    light, ambient = _lighting(rng, config)
    return _Scene(
        objects=objects,
        cam_to_world=cam_to_world,
        ground_colors=np.stack([base, 0.75 * base]),
        ground_tile=rng.uniform(0.6, 1.0),
        light=light,
        ambient=ambient,
    )


def intrinsics_matrix(size: int, fov_degrees: float) -> np.ndarray:
    """(3, 3) float32 pinhole intrinsics of a square `size` image; pixel centres are integers."""
    focal = (size / 2) / math.tan(math.radians(fov_degrees) / 2)
    centre = (size - 1) / 2
    return np.array([[focal, 0, centre], [0, focal, centre], [0, 0, 1]], dtype=np.float32)


def _scene_batch(scenes: Sequence[_Scene], size: int, config: SynthConfig) -> SceneBatch:
    """Stack scenes into padded tensors for the ray caster."""
    V, K = len(scenes), config.max_objects
    T = scenes[0].cam_to_world.shape[0]
    times = np.arange(T, dtype=np.float64)
    present = np.zeros((V, K), bool)
    shape, pattern = np.zeros((V, K), np.int64), np.zeros((V, K), np.int64)
    center = np.zeros((V, T, K, 3))
    yaw = np.zeros((V, T, K))
    half, color = np.ones((V, K, 3)), np.zeros((V, K, 3))
    frequency = np.ones((V, K))
    for v, scene in enumerate(scenes):
        for k, obj in enumerate(scene.objects):
            present[v, k] = True
            shape[v, k], pattern[v, k], frequency[v, k] = obj.shape, obj.pattern, obj.frequency
            center[v, :, k, :2] = obj.position + times[:, None] * obj.velocity
            center[v, :, k, 2] = obj.half[2]  # resting on the ground
            yaw[v, :, k] = obj.yaw + times * obj.spin
            half[v, k], color[v, k] = obj.half, obj.color
    intrinsics = intrinsics_matrix(size, config.fov_degrees)
    poses = np.stack([s.cam_to_world for s in scenes])

    def f32(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    return SceneBatch(
        height=size,
        width=size,
        focal=float(intrinsics[0, 0]),
        cx=float(intrinsics[0, 2]),
        cy=float(intrinsics[1, 2]),
        cam_origin=f32(poses[:, :, :3, 3]),
        cam_rotation=f32(poses[:, :, :3, :3]),
        present=torch.from_numpy(present),
        shape=torch.from_numpy(shape),
        center=f32(center),
        yaw_cos=f32(np.cos(yaw)),
        yaw_sin=f32(np.sin(yaw)),
        half=f32(half),
        color=f32(color),
        pattern=torch.from_numpy(pattern),
        frequency=f32(frequency),
        ground_colors=f32(np.stack([s.ground_colors for s in scenes])),
        ground_tile=f32(np.array([s.ground_tile for s in scenes])),
        light=f32(np.stack([s.light for s in scenes])),
        ambient=f32(np.array([s.ambient for s in scenes])),
        texture_contrast=config.texture_contrast,
        shadows=config.shadows,
    )


def sample_scenes(
    seed: int,
    split: str,
    indices: Sequence[int],
    size: int,
    frames: int,
    config: SynthConfig | None = None,
) -> SceneBatch:
    """The scenes of videos `indices` of a split, ready for `post3r_data.render.render`."""
    config = config or SynthConfig()
    split = canonical_split(split)
    scenes = [_sample_scene(seed, split, i, frames, config) for i in indices]
    return _scene_batch(scenes, size, config)


def render_videos(
    seed: int,
    split: str,
    indices: Sequence[int],
    size: int = 64,
    frames: int = 8,
    config: SynthConfig | None = None,
) -> list[dict[str, Any]]:
    """Render videos as dicts of arrays in shard layout (see the README for fields and dtypes).

    Runs on one torch thread (see `_single_threaded`); the bytes do not depend on it.
    """
    config = config or SynthConfig()
    split = canonical_split(split)
    scenes = [_sample_scene(seed, split, i, frames, config) for i in indices]
    with _single_threaded():
        out = render(_scene_batch(scenes, size, config))
    intrinsics = np.broadcast_to(intrinsics_matrix(size, config.fov_degrees), (frames, 3, 3))
    videos = []
    for v, (index, scene) in enumerate(zip(indices, scenes, strict=True)):
        meta = {
            "dataset": DATASET,
            "split": split,
            "seed": seed,
            "index": int(index),
            "num_objects": len(scene.objects),
            "objects": [
                {
                    "id": k + 1,
                    "shape": SHAPE_NAMES[o.shape],
                    "color": [round(c, 4) for c in o.color],
                    "pattern": PATTERN_NAMES[o.pattern],
                }
                for k, o in enumerate(scene.objects)
            ],
        }
        videos.append(
            {
                "__key__": f"{DATASET}_{split}_{index:06d}",
                "video": out["rgb"][v].numpy(),
                "segmentations": out["segmentation"][v, ..., None].numpy(),
                "depth": out["depth"][v].numpy(),
                "pointmap": out["pointmap"][v].numpy(),
                "camera_to_world": scene.cam_to_world,
                "intrinsics": np.ascontiguousarray(intrinsics),
                "meta": meta,
            }
        )
    return videos


def _encode(video: dict) -> dict[str, bytes | str]:
    sample: dict[str, bytes | str] = {"__key__": video["__key__"]}
    for name, value in video.items():
        if name == "meta":
            sample["meta.json"] = json.dumps(value, sort_keys=True).encode()
        elif name != "__key__":
            sample[f"{name}.npy"] = encode_npy(value)
    return sample


@dataclass
class SynthResult:
    """What `generate_synthetic_dataset` wrote (or found already written)."""

    out_dir: Path
    splits: dict[str, ShardSummary] = field(default_factory=dict)
    rendered_videos: int = 0  # videos rendered by this call (kept shards are not re-rendered)
    seconds: float = 0.0

    @property
    def videos_per_second(self) -> float:
        return self.rendered_videos / self.seconds if self.seconds > 0 else float("nan")


def _render_groups(indices: list[int], size: int, frames: int) -> Iterator[list[int]]:
    per_group = max(1, _RAYS_PER_RENDER // (frames * size * size))
    for start in range(0, len(indices), per_group):
        yield indices[start : start + per_group]


def generate_synthetic_dataset(
    out_dir: str | Path,
    num_videos: int,
    size: int = 64,
    frames: int = 8,
    seed: int = 0,
    *,
    num_val_videos: int | None = None,
    videos_per_shard: int = 32,
    config: SynthConfig | None = None,
    overwrite: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> SynthResult:
    """Write `synthetic-train-NNNNNN.tar` and `synthetic-validation-NNNNNN.tar` into out_dir.

    `num_videos` training videos and `num_val_videos` (default `max(1, num_videos // 8)`)
    validation videos. Each video is a pure function of (seed, split, index, size, frames,
    config), so the same arguments give the same bytes. Calling again with the same arguments
    keeps finished shards and only writes missing ones; different arguments on an existing
    directory raise unless `overwrite=True`, which first deletes the old synthetic shards.
    `workers` > 1 renders shards in that many processes (each single-threaded).
    """
    config = config or SynthConfig()
    if num_videos < 1 or size < 8 or frames < 1 or videos_per_shard < 1:
        raise ValueError(
            f"need num_videos >= 1, size >= 8, frames >= 1, videos_per_shard >= 1; got "
            f"{num_videos}, {size}, {frames}, {videos_per_shard}"
        )
    if size > MAX_SIZE:
        raise ValueError(
            f"size {size} is beyond {MAX_SIZE} pixels: one {size}x{size} frame with its depth and "
            f"pointmap takes {size * size * 19 / 1e9:.1f} GB (the scenes are simple: 64-512 "
            "is what training uses)"
        )
    num_val_videos = max(1, num_videos // 8) if num_val_videos is None else num_val_videos
    if num_val_videos < 0:
        raise ValueError(f"num_val_videos must be >= 0, got {num_val_videos}")
    out_dir = Path(out_dir).expanduser()
    settings = {
        "num_videos": num_videos,
        "num_val_videos": num_val_videos,
        "size": size,
        "frames": frames,
        "seed": seed,
        "videos_per_shard": videos_per_shard,
        "config": asdict(config) | {"shapes": list(config.shapes)},
    }
    prepare_output_dir(out_dir, DATASET, settings, overwrite)

    result = SynthResult(out_dir=out_dir)
    counts = {"train": num_videos, "validation": num_val_videos}
    plan = {
        split: plan_shards(out_dir, DATASET, split, range(count), videos_per_shard)
        for split, count in counts.items()
    }
    todo = [
        (path, split, indices)
        for split in plan
        for path, indices in plan[split]
        if not path.exists()
    ]
    result.rendered_videos = sum(len(indices) for _, _, indices in todo)
    total = sum(counts.values())
    start = time.perf_counter()
    with tqdm(
        total=total,
        initial=total - result.rendered_videos,
        desc="synthetic",
        unit="video",
        disable=not progress,
    ) as bar:
        jobs = [(path, seed, split, indices, size, frames, config) for path, split, indices in todo]
        for written in ordered_map(_write_synthetic_shard, jobs, workers):
            bar.update(written)
    result.seconds = time.perf_counter() - start
    result.splits = {
        split: summarize_shards(path for path, _ in shards) for split, shards in plan.items()
    }
    info = {"dataset": DATASET, "settings": settings, "complete": True}
    info["splits"] = {split: s.as_dict() for split, s in result.splits.items()}
    write_json_atomic(out_dir / f"{DATASET}-info.json", info)
    return result


@contextmanager
def _single_threaded() -> Iterator[None]:
    """Render with one torch thread. The tensors are small, so parallel regions gain little,
    and on a busy machine each one can stall for milliseconds waiting for its second thread;
    use processes (`workers`) for parallelism instead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _write_synthetic_shard(job: tuple) -> int:
    """Render videos `indices` of a split into one shard; return how many."""
    path, seed, split, indices, size, frames, config = job
    samples = (
        _encode(video)
        for group in _render_groups(indices, size, frames)
        for video in render_videos(seed, split, group, size, frames, config)
    )
    write_shard(path, samples)
    return len(indices)
