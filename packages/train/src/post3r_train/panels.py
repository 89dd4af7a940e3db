"""Labelled grids of what the slots do: the validation's `masks.png` and `masks.gif`.

`masks.png`: per video a block of rows, each labelled on the left: `input`, one row per decoder
(`feature masks`, `pointmap masks`: the frame tinted by the winning slot's colour),
`ground truth` (instance ids, when the batch has segmentations) and `3D slots` (each frame's
per-slot points, coloured by slot, drawn by `post3r_train.render` from a camera 45 degrees around
the video's scene centre); columns are frames, numbered on top. `masks.gif`: one frame per
video frame, the same panels as columns (labelled on top) and one row per video, with the frame
number in the title.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from post3r_train.render import orbit_cameras, scene_bounds, splat
from post3r_train.visualize import overlay, palette, to_uint8

CELL = 128  # pixels of one panel's longer side
LABEL_WIDTH = 110
HEADER = 16
TEXT = (235, 235, 235)
PAPER = (16, 16, 20)


def ground_truth_panels(segmentations: Tensor) -> np.ndarray:
    """Instance ids (T, H, W) -> (T, H, W, 3): background dark, each id in a palette colour."""
    ids = segmentations.long().cpu().numpy()
    colors = np.concatenate([[[40, 40, 40]], palette(max(1, int(ids.max())))])
    return colors[ids].astype(np.uint8)


def slot_renders(
    slot_pointmaps: Tensor, pointmap_masks: Tensor, size: tuple[int, int], radius: int = 2
) -> np.ndarray:
    """(T, K, h, w, 3) points and (T, K, h, w) masks -> (T, H, W, 3): each frame's winning slot
    points in slot colours, from one camera 45 degrees around the video's scene centre."""
    t, k = pointmap_masks.shape[:2]
    winner = pointmap_masks.float().argmax(1)  # (T, h, w)
    points = slot_pointmaps.float().permute(0, 2, 3, 1, 4)  # (T, h, w, K, 3)
    points = points.gather(3, winner[..., None, None].expand(*winner.shape, 1, 3))[..., 0, :]
    centre, extent = scene_bounds(points.reshape(-1, 3).cpu())
    up = torch.tensor([0.0, -1.0, 0.0])  # OpenCV world: y down
    camera = orbit_cameras(centre, 3.0 * extent, 8, up, start=torch.zeros(3))[1]
    focal = 0.5 * size[1] / math.tan(math.radians(25))
    colors = torch.from_numpy(palette(k))
    renders = []
    for frame in range(t):
        image, _ = splat(
            points[frame].reshape(-1, 3).cpu(),
            colors[winner[frame].reshape(-1).cpu()],
            camera,
            focal,
            size,
            radius=radius,
        )
        renders.append(image.numpy())
    return np.stack(renders)


def video_rows(
    frames: Tensor,
    masks: dict[str, Tensor],
    segmentations: Tensor | None = None,
    slot_points: tuple[Tensor, Tensor] | None = None,
) -> list[tuple[str, np.ndarray]]:
    """The labelled rows of one video: [(label, (T, H, W, 3) uint8)]."""
    height, width = frames.shape[-2:]
    rows = [("input", to_uint8(frames))]
    rows += [(f"{name} masks", overlay(frames, m)) for name, m in masks.items()]
    if segmentations is not None:
        gt = ground_truth_panels(segmentations)
        if gt.shape[1:3] != (height, width):
            gt = np.stack([np.asarray(Image.fromarray(g).resize((width, height), 0)) for g in gt])
        rows.append(("ground truth", gt))
    if slot_points is not None:
        rows.append(("3D slots", slot_renders(*slot_points, (height, width))))
    return rows


def _cell(image: np.ndarray) -> Image.Image:
    height, width = image.shape[:2]
    scale = CELL / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return Image.fromarray(image).resize(size, Image.Resampling.NEAREST)


def labelled_still(videos: list[list[tuple[str, np.ndarray]]], max_frames: int) -> np.ndarray:
    """masks.png: rows per video and panel kind, labelled; columns are frames, numbered."""
    font = ImageFont.load_default()
    shown = min(max_frames, videos[0][0][1].shape[0])
    cell = _cell(videos[0][0][1][0])
    cw, ch = cell.size
    rows = sum(len(v) for v in videos)
    canvas = Image.new(
        "RGB", (LABEL_WIDTH + shown * cw, HEADER + rows * ch + 4 * (len(videos) - 1)), PAPER
    )
    draw = ImageDraw.Draw(canvas)
    for t in range(shown):
        draw.text((LABEL_WIDTH + t * cw + 4, 2), f"frame {t}", fill=TEXT, font=font)
    top = HEADER
    for b, video in enumerate(videos):
        for index, (label, images) in enumerate(video):
            name = f"video {b}: {label}" if index == 0 else label
            draw.text((4, top + ch // 2 - 6), name, fill=TEXT, font=font)
            for t in range(shown):
                canvas.paste(_cell(images[t]), (LABEL_WIDTH + t * cw, top))
            top += ch
        top += 4  # a gap between videos
    return np.asarray(canvas)


def labelled_animation(videos: list[list[tuple[str, np.ndarray]]]) -> list[np.ndarray]:
    """masks.gif's frames: panel kinds as labelled columns, videos as rows, the frame number."""
    font = ImageFont.load_default()
    count = videos[0][0][1].shape[0]
    cw, ch = _cell(videos[0][0][1][0]).size
    columns = max(len(v) for v in videos)
    out = []
    for t in range(count):
        canvas = Image.new(
            "RGB", (LABEL_WIDTH + columns * cw, 2 * HEADER + len(videos) * ch), PAPER
        )
        draw = ImageDraw.Draw(canvas)
        draw.text((4, 2), f"frame {t} / {count - 1}", fill=TEXT, font=font)
        for index, (label, _) in enumerate(videos[0]):
            draw.text((LABEL_WIDTH + index * cw + 4, HEADER + 2), label, fill=TEXT, font=font)
        for b, video in enumerate(videos):
            top = 2 * HEADER + b * ch
            draw.text((4, top + ch // 2 - 6), f"video {b}", fill=TEXT, font=font)
            for index, (_, images) in enumerate(video):
                canvas.paste(_cell(images[t]), (LABEL_WIDTH + index * cw, top))
        out.append(np.asarray(canvas))
    return out
