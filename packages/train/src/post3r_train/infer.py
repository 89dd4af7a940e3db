"""`uv run apps/infer RUN_OR_CKPT INPUT [--output DIR]`: objects in a video.

INPUT is a folder of frames (png/jpg/...) or a video file (read with PyAV). Frames are centre-
cropped to a square and resized to the model's input size, then streamed through the model in
clips (slots, and the TTT3R state if the run has that teacher, carry over between clips, so
memory does not grow with the length). Written to DIR (default: INPUT's name + `_post3r`):
`masks.mp4` (every slot in its colour), `objects/slotK.mp4` (each slot's mask), `overlay.gif`,
`masks.npy` (slot id per pixel, uint8 (T, H, W)) and `points/slotK.ply` + `points/slots.ply`
(each slot's 3D points over the whole video).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, cast

import numpy as np
import torch
from PIL import Image

from post3r_train.atomic import atomic_write
from post3r_train.config import ConfigError
from post3r_train.visualize import (
    overlay,
    palette,
    save_gif,
    slot_clouds,
    upscale,
    write_point_clouds,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def read_frames(source: Path, max_frames: int | None = None, stride: int = 1) -> list[Image.Image]:
    """RGB frames of a folder of images (sorted by name) or of a video file."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such folder of frames or video file")
    if source.is_dir():
        paths = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise FileNotFoundError(
                f"{source} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        frames = [Image.open(p).convert("RGB") for p in paths[::stride][:max_frames]]
    else:
        frames = _read_video(source, max_frames, stride)
    if not frames:
        raise ValueError(f"{source}: no frames could be read")
    return frames


def _read_video(path: Path, max_frames: int | None, stride: int) -> list[Image.Image]:
    import av

    frames: list[Image.Image] = []
    try:
        with av.open(str(path)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index % stride == 0:
                    frames.append(frame.to_image().convert("RGB"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except (av.error.FFmpegError, IndexError) as error:
        raise ValueError(f"{path}: not a readable video ({error})") from error
    return frames


def to_tensor(frames: list[Image.Image], size: tuple[int, int]) -> torch.Tensor:
    """Centre square crop, resize to `size` (H, W): (T, 3, H, W) float in [0, 1]."""
    out = []
    for image in frames:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        image = image.resize((size[1], size[0]), Image.Resampling.BICUBIC)
        out.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    return torch.stack(out).float() / 255


@torch.no_grad()
def run_model(model, frames: torch.Tensor, chunk: int, device: torch.device) -> dict:
    """Stream (T, 3, H, W) through the model in clips of `chunk` frames. Returns
    `<decoder>_image_masks` (T, K, H, W) per decoder and, with the pointmap decoder, its
    slot_pointmaps (T, K, h, w, 3) and pointmap_masks (T, K, h, w)."""
    previous, state, pieces = None, None, []
    for start in range(0, len(frames), chunk):
        batch = {"frames": frames[None, start : start + chunk].to(device)}
        out = model(batch, previous_slots=previous, teacher_state=state, targets=False)
        previous, state = out.predicted_slots[:, -1], out.teacher_state
        masks = model.image_masks(out, model.image_size).by_decoder()
        piece = {f"{key}_image_masks": value[0].cpu() for key, value in masks.items()}
        if out.pointmap is not None:
            piece["slot_pointmaps"] = out.pointmap.slot_pointmaps[0].cpu()
            piece["pointmap_masks"] = out.pointmap.masks[0].cpu()
        pieces.append(piece)
    return {key: torch.cat([p[key] for p in pieces]) for key in pieces[0]}


def save_video(path: Path, frames: np.ndarray, fps: float) -> Path:
    """uint8 (T, H, W, 3) -> H.264 (or MPEG-4) video, atomically."""
    import av

    height, width = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"

    def write(file: IO[bytes]) -> None:
        with av.open(file, mode="w", format="mp4") as container:
            stream = cast(av.VideoStream, container.add_stream(codec, rate=max(1, round(fps))))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for image in frames[:, :height, :width]:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode())

    return atomic_write(path, write, make_parents=True)


def _enlarge(images: np.ndarray) -> np.ndarray:
    return upscale(images, min_side=256)  # outputs are watched on their own: larger than visuals


def write_outputs(frames: torch.Tensor, result: dict, output: Path, fps: float) -> list[Path]:
    masks = result.get("feature_image_masks", result.get("pointmap_image_masks"))
    if masks is None:
        raise ValueError("the model returned no masks (it has neither decoder)")
    ids = masks.argmax(1).numpy().astype(np.uint8)  # (T, H, W)
    colors = palette(masks.shape[1])
    paths = [save_video(output / "masks.mp4", _enlarge(colors[ids]), fps)]
    for k in np.unique(ids):
        binary = np.repeat((ids == k)[..., None] * np.uint8(255), 3, axis=-1)
        paths.append(save_video(output / "objects" / f"slot{k}.mp4", _enlarge(binary), fps))
    paths.append(save_gif(output / "overlay.gif", list(_enlarge(overlay(frames, masks))), fps))
    paths.append(
        atomic_write(output / "masks.npy", lambda file: np.save(file, ids), make_parents=True)
    )
    if "slot_pointmaps" in result:
        clouds = slot_clouds(frames, result["slot_pointmaps"], result["pointmap_masks"])
        paths += write_point_clouds(output / "points", "video", clouds)
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apps/infer",
        description="Per-object masks (videos, GIF) and 3D point clouds (PLY) for a video.",
    )
    parser.add_argument("run", type=Path, metavar="RUN_OR_CKPT", help="run directory or .ckpt")
    parser.add_argument("input", type=Path, metavar="INPUT", help="folder of frames or video")
    parser.add_argument("--output", type=Path, help="output folder (default: INPUT_post3r)")
    parser.add_argument("--max-frames", type=int, default=None, help="at most this many frames")
    parser.add_argument("--stride", type=int, default=1, help="keep every n-th frame")
    parser.add_argument("--chunk-size", type=int, default=8, help="frames per clip")
    parser.add_argument("--fps", type=float, default=8.0, help="frame rate of the outputs")
    parser.add_argument("--config", help="config to use instead of the run's config.yaml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from post3r_train.runs import load_run

    try:
        if args.stride < 1 or args.chunk_size < 1:
            raise ValueError("--stride and --chunk-size must be >= 1")
        _, model, checkpoint = load_run(args.run, config=args.config)
        device = torch.device(args.device)
        model.to(device)
        frames = to_tensor(read_frames(args.input, args.max_frames, args.stride), model.image_size)
        result = run_model(model, frames, args.chunk_size, device)
        output = args.output or args.input.with_name(f"{args.input.stem}_post3r")
        paths = write_outputs(frames, result, output, args.fps)
    except (ConfigError, FileNotFoundError, ValueError, KeyError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{len(frames)} frames through {checkpoint}; wrote {len(paths)} files to {output}")
    return 0
