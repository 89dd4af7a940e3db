"""`uv run apps/infer RUN_OR_CKPT INPUT [--output DIR]`: objects in a video, streamed.

INPUT is a folder of frames (png/jpg/..., sorted by name) or a video file (read with PyAV).
Frames are decoded one at a time, centre-cropped to a square and resized to the model's input
size (the model is built for one square size: it cannot take the video's aspect ratio), and
streamed through the model in clips: slots, and the TTT3R state if the run has that teacher,
carry over between clips, so points and cameras of the whole video share one world frame (the
first frame's camera). Every output is written as frames arrive (see `post3r_train.infer_writer`
for the layout, `manifest.json` v1): peak memory does not grow with the video's length.
Everything is validated before any work; the output folder appears only when complete.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from post3r_backbone.allocator import keep_freed_memory_for
from post3r_train.config import ConfigError
from post3r_train.infer_writer import InferWriter, check_output_folder
from post3r_train.teacher import TTT3RTeacher

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


class InputError(ValueError):
    """The frames cannot be read (named, with what to do)."""


@dataclass
class FrameSource:
    """Frames of a folder or video, decoded lazily: `size` (H, W) of the first frame, `count`
    when known up front (None for a video whose container does not say)."""

    path: Path
    size: tuple[int, int]
    count: int | None
    max_frames: int | None
    stride: int
    images: list[Path] | None = None  # a folder's selected files

    def __iter__(self) -> Iterator[np.ndarray]:
        """uint8 (H, W, 3) frames; a frame of another size is resized to `size` (warned once)."""
        frames = self._folder() if self.images is not None else self._video()
        warned = False
        for name, image in frames:
            if image.size != (self.size[1], self.size[0]):
                if not warned:
                    warnings.warn(
                        f"{name} is {image.width}x{image.height} but the first frame is "
                        f"{self.size[1]}x{self.size[0]}: such frames are resized to the first "
                        "frame's size (masks.npy keeps one size)",
                        stacklevel=2,
                    )
                    warned = True
                image = image.resize((self.size[1], self.size[0]), Image.Resampling.BICUBIC)
            yield np.asarray(image.convert("RGB"))

    def _folder(self) -> Iterator[tuple[str, Image.Image]]:
        assert self.images is not None
        for path in self.images:
            try:
                with Image.open(path) as image:
                    yield path.name, image.convert("RGB")
            except (OSError, UnidentifiedImageError, ValueError) as error:
                raise InputError(
                    f"{path}: not a readable image ({error}); remove or replace it"
                ) from error

    def _video(self) -> Iterator[tuple[str, Image.Image]]:
        import av

        kept = 0
        try:
            with av.open(str(self.path)) as container:
                for index, frame in enumerate(container.decode(video=0)):
                    if index % self.stride:
                        continue
                    yield f"frame {index}", frame.to_image()
                    kept += 1
                    if self.max_frames is not None and kept >= self.max_frames:
                        return
        except (av.error.FFmpegError, IndexError) as error:
            raise InputError(f"{self.path}: not a readable video ({error})") from error


def open_frames(source: Path, max_frames: int | None = None, stride: int = 1) -> FrameSource:
    """Check INPUT and read only what is needed to know its frame size and count: every image
    header of a folder (a file that is no image fails here, before any work), a video's first
    frame."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such folder of frames or video file")
    if source.is_dir():
        paths = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise FileNotFoundError(
                f"{source} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        paths = paths[::stride][:max_frames]
        sizes = {}
        for path in paths:
            try:
                with Image.open(path) as image:
                    sizes[path] = image.size
            except (OSError, UnidentifiedImageError) as error:
                raise InputError(
                    f"{path}: not a readable image ({error}); remove or replace it"
                ) from error
        width, height = sizes[paths[0]]
        others = sorted({f"{w}x{h}" for w, h in sizes.values()} - {f"{width}x{height}"})
        if others:
            warnings.warn(
                f"{source}: frames of other sizes ({', '.join(others)}) than the first "
                f"({width}x{height}) are resized to it",
                stacklevel=2,
            )
        return FrameSource(source, (height, width), len(paths), max_frames, stride, paths)
    return _open_video(source, max_frames, stride)


def _open_video(path: Path, max_frames: int | None, stride: int) -> FrameSource:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path}: has no video stream")
            stream = container.streams.video[0]
            first = next(container.decode(video=0), None)
            total = stream.frames or None
    except (av.error.FFmpegError, IndexError) as error:
        raise InputError(f"{path}: not a readable video ({error})") from error
    if first is None:
        raise InputError(f"{path}: no frames could be read")
    count = None if total is None else -(-total // stride)
    if count is not None and max_frames is not None:
        count = min(count, max_frames)
    return FrameSource(path, (first.height, first.width), count, max_frames, stride)


def to_tensor(frames: Sequence[np.ndarray | Image.Image], size: tuple[int, int]) -> torch.Tensor:
    """Centre square crop, resize to `size` (H, W): (T, 3, H, W) float in [0, 1]."""
    out = []
    for frame in frames:
        image = frame if isinstance(frame, Image.Image) else Image.fromarray(frame)
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        image = image.resize((size[1], size[0]), Image.Resampling.BICUBIC)
        out.append(torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1))
    return torch.stack(out).float() / 255


def clips(frames: Iterator[np.ndarray], chunk: int) -> Iterator[list[np.ndarray]]:
    clip: list[np.ndarray] = []
    for frame in frames:
        clip.append(frame)
        if len(clip) == chunk:
            yield clip
            clip = []
    if clip:
        yield clip


@torch.no_grad()
def stream(
    model,
    source: FrameSource,
    writer: InferWriter,
    chunk: int,
    device: torch.device,
    progress: bool = True,
) -> int:
    """Run the model over `source` clip by clip, handing each clip's outputs to `writer`; the
    number of frames."""
    previous, state = None, None
    mask_key = "feature" if model.feature_decoder is not None else "pointmap"
    camera_source = "ttt3r" if isinstance(model.teacher, TTT3RTeacher) else "none"
    bar = tqdm(
        total=source.count, unit="frame", desc="infer", disable=not progress, dynamic_ncols=True
    )
    count = 0
    for images in clips(iter(source), chunk):
        frames = to_tensor(images, model.image_size)
        out = model(
            {"frames": frames[None].to(device)},
            previous_slots=previous,
            teacher_state=state,
            targets=False,
        )
        previous, state = out.predicted_slots[:, -1], out.teacher_state
        masks = model.image_masks(out, model.image_size).by_decoder()[mask_key][0].cpu()
        points = None
        if out.pointmap is not None:
            points = {
                "slot_pointmaps": out.pointmap.slot_pointmaps[0].cpu(),
                "pointmap_masks": out.pointmap.masks[0].cpu(),
            }
            target = out.pointmap.target
            if target is not None and target.confidence is not None:
                points["pointmap_confidence"] = target.confidence[0].cpu()
        poses = None if out.camera_to_world is None else out.camera_to_world[0].cpu()
        writer.add_clip(images, frames, masks, points, poses, camera_source)
        count += len(images)
        bar.update(len(images))
    bar.close()
    return count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apps/infer",
        description="Per-object masks (videos, masks.npy), per-slot 3D point clouds (PLY) and "
        "cameras for a video, in the layout apps/view and apps/render read.",
    )
    parser.add_argument("run", type=Path, metavar="RUN_OR_CKPT", help="run directory or .ckpt")
    parser.add_argument("input", type=Path, metavar="INPUT", help="folder of frames or video")
    parser.add_argument("--output", type=Path, help="output folder (default: INPUT_post3r)")
    parser.add_argument("--max-frames", type=int, default=None, help="at most this many frames")
    parser.add_argument("--stride", type=int, default=1, help="keep every n-th frame")
    parser.add_argument("--chunk-size", type=int, default=8, help="frames per clip")
    parser.add_argument("--fps", type=float, default=8.0, help="frame rate of the output videos")
    parser.add_argument(
        "--points-per-frame", type=int, default=4096, help="points kept per frame for the viewer"
    )
    parser.add_argument(
        "--max-points-per-slot",
        type=int,
        default=200_000,
        help="each slot's whole-video cloud is a uniform sample of at most this many points",
    )
    parser.add_argument("--config", help="config to use instead of the run's config.yaml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Every numeric argument, before anything is read or written."""
    positive = {
        "--stride": args.stride,
        "--chunk-size": args.chunk_size,
        "--points-per-frame": args.points_per_frame,
        "--max-points-per-slot": args.max_points_per_slot,
    }
    if args.max_frames is not None:
        positive["--max-frames"] = args.max_frames
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value}")
    if not (args.fps > 0 and np.isfinite(args.fps)):
        raise ValueError(f"--fps must be a positive number of frames per second, got {args.fps}")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise ValueError(f"--device {args.device!r}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device here; use --device cpu")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from post3r_train.runs import load_run

    writer = None
    try:
        check_arguments(args)
        output = args.output or args.input.with_name(f"{args.input.stem}_post3r")
        source = open_frames(args.input, args.max_frames, args.stride)
        check_output_folder(output)
        _, model, checkpoint = load_run(args.run, config=args.config)
        device = torch.device(args.device)
        keep_freed_memory_for(device)  # each frame re-allocates the same large maps
        model.to(device)
        writer = InferWriter(
            output,
            input_size=source.size,
            model_size=model.image_size,
            num_slots=model.num_slots,
            fps=args.fps,
            source=str(args.input),
            checkpoint=str(checkpoint),
            mask_decoder="feature" if model.feature_decoder is not None else "pointmap",
            points_per_frame=args.points_per_frame,
            max_points_per_slot=args.max_points_per_slot,
        )
        count = stream(model, source, writer, args.chunk_size, device, progress=not args.quiet)
        paths = writer.finish()
    except (ConfigError, FileNotFoundError, ValueError, KeyError, RuntimeError, OSError) as error:
        if writer is not None:
            writer.abort()
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if writer is not None:
            writer.abort()
        print("interrupted: nothing written", file=sys.stderr)
        return 130
    print(f"{count} frames through {checkpoint}; wrote {len(paths)} files to {output}")
    return 0
