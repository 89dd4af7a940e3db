"""Pictures of what the slots do: mask overlays (PNG, animated GIF) and per-slot point clouds (PLY).

All writers are atomic (temporary file in the target folder, then rename).
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from post3r_slots import slot_point_clouds
from post3r_train.atomic import atomic_write


def palette(num_colors: int) -> np.ndarray:
    """(num_colors, 3) uint8 distinct colours (golden-ratio hues)."""
    hues = (np.arange(num_colors) * 0.618033988749895) % 1.0
    colors = [colorsys.hsv_to_rgb(h, 0.85, 0.95) for h in hues]
    return (np.array(colors) * 255).round().astype(np.uint8)


def overlay(frames: Tensor, masks: Tensor, alpha: float = 0.55) -> np.ndarray:
    """Frames (T, 3, H, W) in [0, 1] and slot masks (T, K, H, W) -> uint8 (T, H, W, 3) with each
    pixel tinted by the colour of the slot that wins it."""
    colors = torch.from_numpy(palette(masks.shape[1])).float() / 255
    tint = colors[masks.argmax(1).cpu()]  # (T, H, W, 3)
    image = frames.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1)
    return ((1 - alpha) * image + alpha * tint).mul(255).round().byte().numpy()


def to_uint8(frames: Tensor) -> np.ndarray:
    """(T, 3, H, W) floats in [0, 1] -> (T, H, W, 3) uint8 images."""
    return (
        frames.detach()
        .float()
        .cpu()
        .clamp(0, 1)
        .permute(0, 2, 3, 1)
        .mul(255)
        .round()
        .byte()
        .numpy()
    )


def upscale(image: np.ndarray, min_side: int = 192) -> np.ndarray:
    """(..., H, W, 3) enlarged by an integer factor (pixel repeat: masks stay crisp) until its
    shorter side is at least `min_side`."""
    factor = max(1, int(np.ceil(min_side / min(image.shape[-3:-1]))))
    return image.repeat(factor, axis=-3).repeat(factor, axis=-2) if factor > 1 else image


def save_png(path: Path, image: np.ndarray) -> Path:
    return atomic_write(
        path, lambda file: Image.fromarray(image).save(file, format="PNG"), make_parents=True
    )


def save_gif(path: Path, frames: Sequence[np.ndarray], fps: float = 4.0) -> Path:
    images = [Image.fromarray(frame) for frame in frames]
    duration = int(1000 / fps)

    def write(file: IO[bytes]) -> None:
        images[0].save(
            file, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0
        )

    return atomic_write(path, write, make_parents=True)


def save_ply(path: Path, points: Tensor | np.ndarray, colors: Tensor | np.ndarray) -> Path:
    """Binary little-endian PLY with float32 xyz and uint8 rgb per vertex."""
    payload = ply_payload(points, colors)
    return atomic_write(path, lambda file: file.write(payload), make_parents=True)


def ply_payload(points: Tensor | np.ndarray, colors: Tensor | np.ndarray) -> bytes:
    """The bytes of `save_ply`'s file: finite points only; colours uint8 or floats in [0, 1]."""
    xyz = np.asarray(points.detach().cpu() if isinstance(points, Tensor) else points, np.float32)
    rgb = colors.detach().cpu().numpy() if isinstance(colors, Tensor) else np.asarray(colors)
    if rgb.dtype != np.uint8:
        rgb = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
    keep = np.isfinite(xyz).all(axis=1)
    xyz, rgb = xyz[keep], rgb[keep]
    vertex = np.empty(
        len(xyz),
        dtype=[
            ("x", "<f4"),
            ("y", "<f4"),
            ("z", "<f4"),
            ("red", "u1"),
            ("green", "u1"),
            ("blue", "u1"),
        ],
    )
    for i, axis in enumerate("xyz"):
        vertex[axis] = xyz[:, i]
    for i, channel in enumerate(("red", "green", "blue")):
        vertex[channel] = rgb[:, i]
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {len(vertex)}\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n"
    )
    return header.encode("ascii") + vertex.tobytes()


def read_ply(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Points (P, 3) and colours (P, 3) uint8 of a PLY written by `save_ply`."""
    data = Path(path).read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii")
    count = int(
        next(line for line in header.splitlines() if line.startswith("element vertex")).split()[-1]
    )
    dtype = np.dtype([("xyz", "<f4", 3), ("rgb", "u1", 3)])
    vertex = np.frombuffer(data[end:], dtype=dtype, count=count)
    return vertex["xyz"].copy(), vertex["rgb"].copy()


def slot_clouds(
    frames: Tensor, slot_pointmaps: Tensor, masks: Tensor
) -> list[tuple[Tensor, Tensor]]:
    """One video's per-slot clouds: frames (T, 3, H, W), slot pointmaps (T, K, h, w, 3) and masks
    (T, K, h, w) -> [(points (P, 3), colours (P, 3) in [0, 1]) for each slot]: the pixels a slot
    wins, at its own predicted XYZ, coloured by the frame."""
    size = tuple(masks.shape[-2:])
    colors = F.interpolate(frames.float(), size=size, mode="bilinear", align_corners=False)
    colors = colors.permute(0, 2, 3, 1)[None]  # (1, T, h, w, 3)
    points = slot_point_clouds(slot_pointmaps[None].float(), masks[None].float())[0]
    rgb = slot_point_clouds(colors, masks[None].float())[0]
    return list(zip(points, rgb, strict=True))


def write_point_clouds(
    directory: Path, stem: str, clouds: list[tuple[Tensor, Tensor]]
) -> list[Path]:
    """`<stem>_slotK.ply` per non-empty slot (frame colours) and `<stem>_slots.ply` (all slots,
    coloured by slot)."""
    paths, everything, tints = [], [], []
    colors = palette(len(clouds))
    for k, (points, rgb) in enumerate(clouds):
        if len(points) == 0:
            continue
        paths.append(save_ply(directory / f"{stem}_slot{k}.ply", points, rgb))
        everything.append(points.detach().cpu())
        tints.append(np.broadcast_to(colors[k], (len(points), 3)))
    if everything:
        paths.append(
            save_ply(directory / f"{stem}_slots.ply", torch.cat(everything), np.concatenate(tints))
        )
    return paths


def write_validation_visuals(
    frames: Tensor,
    masks: Mapping[str, Tensor],
    directory: Path,
    *,
    slot_pointmaps: Tensor | None = None,
    pointmap_masks: Tensor | None = None,
    segmentations: Tensor | None = None,
    camera_to_world: Tensor | None = None,
    confidence: Tensor | None = None,
    max_videos: int = 4,
    max_frames: int = 8,
) -> list[Path]:
    """`masks.png` and `masks.gif` (labelled grids, layout in `post3r_train.panels`), per-slot
    PLY clouds of the first video, and the first video in the infer output layout (`video0/`,
    see `post3r_train.infer_writer`) for `apps/view` and `apps/render`.

    frames: (B, T, 3, H, W) in [0, 1] or uint8; masks: {decoder name: (B, T, K, H, W)};
    slot_pointmaps (B, T, K, h, w, 3) and pointmap_masks (B, T, K, h, w) for the clouds;
    segmentations (B, T, H', W') ground-truth ids; camera_to_world (B, T, 4, 4) the poses the
    points were placed with; confidence (B, T, h, w) the teacher's.
    """
    from post3r_train.panels import labelled_animation, labelled_still, video_rows

    if frames.dtype == torch.uint8:
        frames = frames.float() / 255
    if not masks:
        return []
    points = None
    if slot_pointmaps is not None and pointmap_masks is not None:
        points = (slot_pointmaps, pointmap_masks)
    videos = [
        video_rows(
            frames[b],
            {k: m[b] for k, m in masks.items()},
            None if segmentations is None else segmentations[b],
            None if points is None else (points[0][b], points[1][b]),
        )
        for b in range(min(max_videos, frames.shape[0]))
    ]
    paths = [
        save_png(directory / "masks.png", labelled_still(videos, max_frames)),
        save_gif(directory / "masks.gif", labelled_animation(videos)),
    ]
    first = None
    if points is not None:
        clouds = slot_clouds(frames[0], points[0][0], points[1][0])
        paths += write_point_clouds(directory, "video0", clouds)
        first = {"slot_pointmaps": points[0][0], "pointmap_masks": points[1][0]}
        if confidence is not None:
            first["pointmap_confidence"] = confidence[0]
    poses = None if camera_to_world is None else camera_to_world[0]
    paths += _write_video_layout(frames[0], masks, first, poses, directory / "video0")
    return paths


def _write_video_layout(
    frames: Tensor,
    masks: Mapping[str, Tensor],
    points: dict[str, Tensor] | None,
    poses: Tensor | None,
    folder: Path,
) -> list[Path]:
    from post3r_train.infer_writer import InferWriter

    decoder = "feature" if "feature" in masks else next(iter(masks))
    soft = masks[decoder][0].detach().float().cpu()
    height, width = frames.shape[-2:]
    writer = InferWriter(
        folder,
        input_size=(height, width),
        model_size=(height, width),
        num_slots=soft.shape[1],
        fps=4.0,
        source="validation batch, video 0",
        checkpoint="",
        mask_decoder=decoder,
    )
    try:
        if points is not None:
            points = {key: value.detach().float().cpu() for key, value in points.items()}
        cpu_poses = None if poses is None else poses.detach().float().cpu()
        images = list(to_uint8(frames))
        writer.add_clip(images, frames.detach().float().cpu(), soft, points, cpu_poses, "teacher")
        return writer.finish()
    except BaseException:
        writer.abort()
        raise
