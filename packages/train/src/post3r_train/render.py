"""Z-buffered point splatting (torch, CPU or GPU): slot point clouds drawn from any camera.

Cameras use OpenCV axes (x right, y down, z forward), the convention of TTT3R's poses and of
`cameras.json`; a camera is a camera-to-world (4, 4) matrix and a pinhole focal length in pixels
with the principal point at the image centre. Each point covers a square of
`(2 * radius + 1)` pixels; per pixel the nearest point wins (a z-buffer), so near surfaces hide
far ones whatever order the points come in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

BACKGROUND = (24, 24, 28)


def focal_from_fov(width: int, fov_degrees: float) -> float:
    """Focal length in pixels of a horizontal field of view."""
    return 0.5 * width / math.tan(math.radians(fov_degrees) / 2)


def project(
    points: Tensor, camera_to_world: Tensor, focal: float, size: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """World points (N, 3) -> pixel coordinates (N, 2) as (x, y) and depth (N,) along the
    camera's z; the principal point is the image centre ((W - 1) / 2, (H - 1) / 2)."""
    world_to_camera = torch.linalg.inv(camera_to_world.double()).to(points.dtype)
    camera = points @ world_to_camera[:3, :3].T + world_to_camera[:3, 3]
    depth = camera[:, 2]
    height, width = size
    safe = torch.where(depth.abs() > 1e-9, depth, torch.full_like(depth, 1e-9))
    x = focal * camera[:, 0] / safe + (width - 1) / 2
    y = focal * camera[:, 1] / safe + (height - 1) / 2
    return torch.stack([x, y], dim=1), depth


def splat(
    points: Tensor,
    colors: Tensor,
    camera_to_world: Tensor,
    focal: float,
    size: tuple[int, int],
    radius: int = 1,
    background: Sequence[int] = BACKGROUND,
) -> tuple[Tensor, Tensor]:
    """Draw points (N, 3) with uint8 colours (N, 3) into an image (H, W, 3) uint8; also the
    depth buffer (H, W) (inf where nothing was drawn). Points behind the camera or non-finite
    are skipped."""
    height, width = size
    device = points.device
    pixels, depth = project(points.float(), camera_to_world.float().to(device), focal, size)
    keep = torch.isfinite(pixels).all(1) & torch.isfinite(depth) & (depth > 1e-6)
    pixels, depth, colors = pixels[keep].round().long(), depth[keep], colors.to(device)[keep]
    steps = torch.arange(-radius, radius + 1, device=device)
    dy, dx = torch.meshgrid(steps, steps, indexing="ij")
    offsets = torch.stack([dx.flatten(), dy.flatten()], dim=1)  # (S, 2)
    covered = pixels[:, None, :] + offsets[None]  # (N, S, 2)
    depth = depth[:, None].expand(-1, len(offsets)).reshape(-1)
    colors = colors[:, None].expand(-1, len(offsets), 3).reshape(-1, 3)
    covered = covered.reshape(-1, 2)
    inside = (
        (covered[:, 0] >= 0)
        & (covered[:, 0] < width)
        & (covered[:, 1] >= 0)
        & (covered[:, 1] < height)
    )
    covered, depth, colors = covered[inside], depth[inside], colors[inside]
    index = covered[:, 1] * width + covered[:, 0]
    zbuffer = torch.full((height * width,), math.inf, device=device)
    zbuffer.scatter_reduce_(0, index, depth, reduce="amin")
    winner = depth <= zbuffer[index]
    image = torch.tensor(list(background), dtype=torch.uint8, device=device)
    image = image.expand(height * width, 3).clone()
    image[index[winner]] = colors[winner].to(torch.uint8)
    return image.view(height, width, 3), zbuffer.view(height, width)


def look_at(eye: Tensor, target: Tensor, up: Tensor) -> Tensor:
    """Camera-to-world (4, 4), OpenCV axes, at `eye` looking at `target`; `up` is the world
    direction that appears upwards in the image (OpenCV's -y)."""
    forward = target - eye
    forward = forward / forward.norm()
    right = torch.linalg.cross(forward, up)
    if right.norm() < 1e-6:  # looking along `up`: any perpendicular will do
        right = torch.linalg.cross(forward, torch.tensor([1.0, 0.0, 0.0]).to(eye))
    right = right / right.norm()
    down = torch.linalg.cross(forward, right)
    pose = torch.eye(4, dtype=eye.dtype)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, down, forward, eye
    return pose


def scene_bounds(points: Tensor) -> tuple[Tensor, float]:
    """A robust centre (per-axis median) and radius (90th percentile distance) of points."""
    finite = points[torch.isfinite(points).all(1)].float()
    if len(finite) == 0:
        return torch.zeros(3), 1.0
    centre = finite.median(dim=0).values
    distance = (finite - centre).norm(dim=1)
    return centre, max(float(torch.quantile(distance, 0.9)), 1e-6)


def orbit_cameras(
    centre: Tensor,
    radius: float,
    count: int,
    up: Tensor,
    start: Tensor | None = None,
    elevation_degrees: float = 20.0,
) -> list[Tensor]:
    """`count` cameras on a circle around `centre` at `radius`, looking at it, starting from the
    direction of `start` (a camera position; default: behind the centre along -z)."""
    up = up / up.norm()
    start_dir = (start - centre) if start is not None else torch.tensor([0.0, 0.0, -1.0])
    start_dir = start_dir - (start_dir @ up) * up  # in the orbit's plane
    if start_dir.norm() < 1e-6:
        start_dir = torch.linalg.cross(up, torch.tensor([1.0, 0.0, 0.0]))
    a = start_dir / start_dir.norm()
    b = torch.linalg.cross(up, a)
    elevation = math.radians(elevation_degrees)
    cameras = []
    for i in range(count):
        angle = 2 * math.pi * i / count
        around = math.cos(angle) * a + math.sin(angle) * b
        offset = radius * (math.cos(elevation) * around + math.sin(elevation) * up)
        cameras.append(look_at(centre + offset, centre, up))
    return cameras


def pulled_back(camera_to_world: Tensor, distance: float) -> Tensor:
    """The same camera moved `distance` backwards along its viewing axis."""
    pose = camera_to_world.clone()
    pose[:3, 3] = pose[:3, 3] - distance * pose[:3, 2]
    return pose


def draw_legend(image: np.ndarray, names: Sequence[str], colors: np.ndarray) -> np.ndarray:
    """A colour box and a name per entry, top left, on a copy of `image` (H, W, 3) uint8."""
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    line = 12
    width = 18 + max((int(draw.textlength(n, font=font)) for n in names), default=0)
    draw.rectangle([2, 2, 6 + width, 6 + line * len(names)], fill=(0, 0, 0))
    for i, (name, color) in enumerate(zip(names, colors, strict=True)):
        top = 4 + i * line
        draw.rectangle([5, top + 1, 13, top + 9], fill=tuple(int(c) for c in color))
        draw.text((17, top - 1), name, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)
