"""`uv run apps/render OUTPUT [--orbit] [--out FILE.mp4]`: a video of the slots' 3D points.

OUTPUT is an infer output folder or a run directory (its latest validation video), as for
`apps/view`. Each slot's whole-video cloud (`points/slotK.ply`) is drawn by the z-buffered
splatting renderer (`post3r_train.render`) in the slot's colour, with a legend, either from
cameras orbiting the scene centre (`--orbit`, starting at the first camera) or along the
original camera trajectory pulled back behind each camera. Writes FILE.mp4 and FILE.gif (the GIF
at most 320 pixels wide and 120 frames).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from post3r_train.infer_writer import VideoEncoder, read_manifest
from post3r_train.render import (
    draw_legend,
    focal_from_fov,
    orbit_cameras,
    pulled_back,
    scene_bounds,
    splat,
)
from post3r_train.visualize import read_ply, save_gif

GIF_WIDTH, GIF_FRAMES = 320, 120


def load_clouds(
    folder: Path, manifest: dict, max_points: int, rgb: bool, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """All slots' points (N, 3), their colours (N, 3) uint8 (slot colours, or the frame's with
    `rgb`) and the slots present; at most `max_points` (a uniform random subset)."""
    colors = np.asarray(manifest["palette"], np.uint8)
    points, tints, slots = [], [], []
    for k in range(manifest["num_slots"]):
        path = folder / "points" / f"slot{k}.ply"
        if not path.is_file():
            continue
        xyz, frame_rgb = read_ply(path)
        points.append(xyz)
        tints.append(frame_rgb if rgb else np.broadcast_to(colors[k], xyz.shape))
        slots.append(k)
    if not points:
        raise ValueError(f"{folder} has no slot point clouds (points/slotK.ply) to render")
    xyz, tint = np.concatenate(points), np.concatenate(tints)
    if len(xyz) > max_points:
        keep = np.random.default_rng(seed).choice(len(xyz), max_points, replace=False)
        xyz, tint = xyz[keep], tint[keep]
    return torch.from_numpy(xyz), torch.from_numpy(np.ascontiguousarray(tint)), slots


def render_size(manifest: dict, height: int) -> tuple[int, int]:
    """(H, W) of the video: `height` tall at the input's aspect ratio, both even."""
    in_h, in_w = manifest["input_size"]
    return height // 2 * 2, max(2, round(height * in_w / in_h) // 2 * 2)


def camera_path(
    poses: torch.Tensor, centre: torch.Tensor, extent: float, orbit: bool, frames: int
) -> list[torch.Tensor]:
    """The cameras to draw from: an orbit around `centre` or each original camera pulled back
    by 1.5 scene radii (`extent`)."""
    if orbit:
        up = -poses[0, :3, 1]  # the first camera's up (OpenCV: -y)
        return orbit_cameras(centre, 3.0 * extent, frames, up, start=poses[0, :3, 3])
    return [pulled_back(pose, 1.5 * extent) for pose in poses]


def focal_for(cameras: dict, manifest: dict, size: tuple[int, int]) -> float:
    """The video's focal length in render pixels: the median estimated one (it is in pixels of
    the model's square input, which is the input's shorter side), else a 60 degree view."""
    focals = [c["focal_px"] for c in cameras["frames"] if c.get("focal_px")]
    if not focals:
        return focal_from_fov(size[1], 60.0)
    return float(np.median(focals)) * min(size) / manifest["model_size"][0]


def render_video(
    folder: Path,
    out: Path,
    *,
    orbit: bool,
    frames: int,
    height: int,
    fps: float,
    radius: int,
    max_points: int,
    rgb: bool,
    device: torch.device,
    progress: bool = True,
) -> list[Path]:
    manifest = read_manifest(folder)
    cameras = json.loads((folder / "cameras.json").read_text())
    points, colors, slots = load_clouds(folder, manifest, max_points, rgb)
    poses = torch.tensor([c["camera_to_world"] for c in cameras["frames"]], dtype=torch.float32)
    centre, extent = scene_bounds(points)
    size = render_size(manifest, height)
    focal = focal_for(cameras, manifest, size)
    path = camera_path(poses, centre, extent, orbit, frames)
    names = [f"slot {k}" for k in slots]
    legend = np.asarray(manifest["palette"], np.uint8)[slots]
    points, colors = points.to(device), colors.to(device)
    tmp = out.with_name(f".{out.stem}.{uuid.uuid4().hex[:8]}.tmp{out.suffix}")
    encoder = VideoEncoder(tmp, size, fps)
    gif_every = max(1, math.ceil(len(path) / GIF_FRAMES))
    gif_frames = []
    try:
        for index, camera in enumerate(
            tqdm(path, desc="render", unit="frame", disable=not progress)
        ):
            drawn, _ = splat(points, colors, camera.to(device), focal, size, radius=radius)
            image = draw_legend(drawn.cpu().numpy(), names, legend)
            encoder.write(image)
            if index % gif_every == 0:
                gif_frames.append(_small(image))
        encoder.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    gif = save_gif(out.with_suffix(".gif"), gif_frames, fps=fps / gif_every)
    return [out, gif]


def _small(image: np.ndarray) -> np.ndarray:
    from PIL import Image

    height, width = image.shape[:2]
    if width <= GIF_WIDTH:
        return image
    size = (GIF_WIDTH, max(1, round(height * GIF_WIDTH / width)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apps/render",
        description="A video (MP4 and GIF) of the slots' 3D point clouds from a new camera path.",
    )
    parser.add_argument("output", type=Path, metavar="OUTPUT", help="infer output or run dir")
    parser.add_argument("--orbit", action="store_true", help="orbit the scene centre")
    parser.add_argument("--out", type=Path, help="video file (default: OUTPUT/render_*.mp4)")
    parser.add_argument("--frames", type=int, default=72, help="orbit length in frames")
    parser.add_argument("--height", type=int, default=360, help="video height in pixels")
    parser.add_argument("--fps", type=float, default=24.0)
    parser.add_argument("--radius", type=int, default=1, help="splat half-size in pixels")
    parser.add_argument("--max-points", type=int, default=300_000, help="points drawn at most")
    parser.add_argument("--rgb", action="store_true", help="frame colours instead of slot ones")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from post3r_train.viewer import find_output

    try:
        for name in ("frames", "height", "max_points"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if args.radius < 0 or not args.fps > 0:
            raise ValueError("--radius must be >= 0 and --fps > 0")
        folder = find_output(args.output)
        out = args.out or folder / f"render_{'orbit' if args.orbit else 'trajectory'}.mp4"
        if out.suffix.lower() != ".mp4":
            raise ValueError(f"--out {out}: name an .mp4 file (the GIF is written next to it)")
        out.parent.mkdir(parents=True, exist_ok=True)
        paths = render_video(
            folder,
            out,
            orbit=args.orbit,
            frames=args.frames,
            height=args.height,
            fps=args.fps,
            radius=args.radius,
            max_points=args.max_points,
            rgb=args.rgb,
            device=torch.device(args.device),
            progress=not args.quiet,
        )
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print("wrote " + " and ".join(str(p) for p in paths))
    return 0
