"""Convert YouTube-VIS 2021 (official download layout) to WebDataset shards.

Input: `<input>/train/JPEGImages/<video>/<frame>.jpg` and `<input>/train/instances.json`
(per-frame COCO masks: polygons, RLE or compressed RLE, `null` where the object is absent).
Only the official train split has masks, so validation is its last `val_videos` videos (300,
as in SlotContrast) and training the rest, in the JSON's order.

Output: `ytvis-train-NNNNNN.tar` and `ytvis-validation-NNNNNN.tar` in SlotContrast's format:
`__key__` = the YT-VIS video id, `video.npy` uint8 (T, H, W, 3) with the short side resized to
`size`, `segmentations.npy` uint8 (T, H, W, I) with one channel per instance holding its
category id (0 where absent), plus a small `meta.json`. Shard k of a split always holds videos
[k * n, (k + 1) * n) of that split, so an interrupted run resumes by keeping finished shards.

CLI: `uv run apps/prepare-ytvis --input RAW --output OUT [--size 518] [--workers N]`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask
from tqdm import tqdm

from post3r_data.clips import nearest_indices
from post3r_data.errors import DataError
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

DATASET = "ytvis"
RESAMPLING_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "area": Image.Resampling.BOX}
_DOWNLOAD_HINT = (
    "download YouTube-VIS 2021 from https://youtube-vos.org/dataset/vis/ and unpack it so that "
    "<input>/train/JPEGImages/ and <input>/train/instances.json exist"
)


class BadVideoError(DataError, ValueError):
    """A video whose frames or annotations cannot be converted."""

    def __init__(self, video_id: Any, name: str, reason: str) -> None:
        super().__init__(f"video {video_id} ({name}): {reason}")
        self.video_id, self.name, self.reason = video_id, name, reason

    def __reduce__(self) -> tuple:
        # Rebuilt from the constructor's arguments (the default would pass the message alone),
        # so the error survives the trip back from a conversion worker process.
        return type(self), (self.video_id, self.name, self.reason)


@dataclass(frozen=True)
class _Task:
    """Everything one worker needs to convert one video."""

    video: dict
    annotations: tuple[dict, ...]
    image_root: Path
    size: int
    resample: str


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the short side scaled to `size`, the long side rounded half up."""
    if height <= width:
        return size, int(width * size / height + 0.5)
    return int(height * size / width + 0.5), size


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """(H, W) uint8 0/1 mask from a COCO polygon list, RLE or compressed RLE."""
    if isinstance(segmentation, list):  # polygons
        if not segmentation:
            return np.zeros((height, width), np.uint8)
        rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = coco_mask.frPyObjects(segmentation, height, width)  # uncompressed RLE
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        rle = segmentation  # compressed RLE
    else:
        raise ValueError(f"unknown segmentation format {type(segmentation).__name__}")
    with warnings.catch_warnings():  # pycocotools' own NumPy 2 deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        decoded = coco_mask.decode(rle)
    if decoded.shape != (height, width):
        raise ValueError(f"mask of size {decoded.shape} in a {height}x{width} video")
    return decoded


def _load_frames(task: _Task, name: str) -> list[Image.Image]:
    video = task.video
    frames = []
    for file_name in video["file_names"]:
        path = task.image_root / file_name
        if not path.is_file():
            raise BadVideoError(video["id"], name, f"frame {path} is missing")
        try:
            with Image.open(path) as image:
                frames.append(image.convert("RGB"))
        except OSError as error:
            raise BadVideoError(video["id"], name, f"cannot decode {path}: {error}") from None
    sizes = {f.size for f in frames}
    expected = (video.get("width"), video.get("height"))
    if len(sizes) != 1 or (None not in expected and sizes != {expected}):
        raise BadVideoError(
            video["id"],
            name,
            f"frame sizes {sorted(sizes)} differ from each other or from {expected}",
        )
    return frames


def _instance_masks(
    task: _Task, name: str, height: int, width: int, out_hw: tuple[int, int]
) -> np.ndarray:
    """(T, h, w, I) uint8 category ids, one channel per instance (one empty channel if none)."""
    frames = len(task.video["file_names"])
    rows, cols = nearest_indices(height, out_hw[0]), nearest_indices(width, out_hw[1])
    channels = []
    for annotation in task.annotations:
        segmentations = annotation.get("segmentations") or []
        if len(segmentations) != frames:
            raise BadVideoError(
                task.video["id"],
                name,
                f"annotation {annotation.get('id')} has {len(segmentations)} masks "
                f"for {frames} frames",
            )
        category = annotation.get("category_id")
        if not isinstance(category, int) or not 1 <= category <= 255:
            raise BadVideoError(task.video["id"], name, f"category id {category} outside 1..255")
        channel = np.zeros((frames, *out_hw), np.uint8)
        for t, segmentation in enumerate(segmentations):
            if segmentation is None:  # the object is absent from this frame
                continue
            try:
                full = decode_segmentation(segmentation, height, width)
            except (ValueError, TypeError) as error:
                raise BadVideoError(
                    task.video["id"], name, f"annotation {annotation.get('id')} frame {t}: {error}"
                ) from None
            channel[t] = full[rows][:, cols] * np.uint8(category)
        channels.append(channel)
    if not channels:
        return np.zeros((frames, *out_hw, 1), np.uint8)
    return np.stack(channels, axis=-1)


def convert_video(task: _Task) -> dict[str, bytes | str]:
    """One video as an encoded shard sample; raises BadVideoError naming the video."""
    video = task.video
    files = video.get("file_names") or []
    name = files[0].split("/")[0] if files else "?"
    if not files:
        raise BadVideoError(video["id"], name, "lists no frames")
    if video.get("length", len(files)) != len(files):
        raise BadVideoError(
            video["id"], name, f"length {video['length']} but {len(files)} file names"
        )
    frames = _load_frames(task, name)
    width, height = frames[0].size
    out_h, out_w = resized_shape(height, width, task.size)
    if (out_h, out_w) != (height, width):
        frames = [f.resize((out_w, out_h), RESAMPLING_FILTERS[task.resample]) for f in frames]
    pixels = np.stack([np.asarray(f) for f in frames])
    masks = _instance_masks(task, name, height, width, (out_h, out_w))
    meta = {
        "video_id": video["id"],
        "name": name,
        "original_size": [height, width],
        "num_objects": len(task.annotations),
        "category_ids": [a["category_id"] for a in task.annotations],
        "annotation_ids": [a.get("id") for a in task.annotations],
    }
    return {
        "__key__": str(video["id"]),
        "video.npy": encode_npy(pixels),
        "segmentations.npy": encode_npy(masks),
        "meta.json": json.dumps(meta, sort_keys=True).encode(),
    }


def _try_convert(task: _Task) -> dict[str, bytes | str] | BadVideoError:
    """Return the error instead of raising, so the pool keeps going and the main decides."""
    try:
        return convert_video(task)
    except BadVideoError as error:
        return error


def load_annotations(input_dir: Path) -> tuple[list[dict], dict[Any, list[dict]]]:
    """Videos in JSON order and the non-crowd annotations of each video."""
    path = input_dir / "train" / "instances.json"
    if not path.is_file():
        raise FileNotFoundError(f"YouTube-VIS annotations not found at {path}; {_DOWNLOAD_HINT}")
    try:
        content = json.loads(path.read_text())
        videos = content["videos"]
        by_video: dict[Any, list[dict]] = {v["id"]: [] for v in videos}
        for annotation in content.get("annotations") or []:
            if not annotation.get("iscrowd", 0) and annotation["video_id"] in by_video:
                by_video[annotation["video_id"]].append(annotation)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{path} is not a YouTube-VIS instances file ({type(error).__name__}: {error})"
        ) from None
    return videos, by_video


@dataclass
class ConversionResult:
    """Totals per split (over all finished shards) and the videos left out with --skip-bad."""

    splits: dict[str, ShardSummary] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    kept_shards: int = 0  # finished shards found from an earlier run and not redone


def convert_ytvis(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    size: int = 518,
    workers: int = 1,
    videos_per_shard: int = 10,
    val_videos: int = 300,
    splits: Sequence[str] = ("train", "validation"),
    resample: str = "bilinear",
    skip_bad: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> ConversionResult:
    """Convert the official train split into training and validation shards (see module doc)."""
    input_dir, output_dir = Path(input_dir).expanduser(), Path(output_dir).expanduser()
    if resample not in RESAMPLING_FILTERS:
        raise ValueError(f"resample must be one of {sorted(RESAMPLING_FILTERS)}, got {resample!r}")
    if size < 1 or videos_per_shard < 1 or val_videos < 0:
        raise ValueError("size and videos_per_shard must be >= 1 and val_videos >= 0")
    splits = [canonical_split(split) for split in splits]
    videos, annotations = load_annotations(input_dir)
    if val_videos >= len(videos):
        raise ValueError(f"val_videos={val_videos} leaves no training videos out of {len(videos)}")
    image_root = input_dir / "train" / "JPEGImages"
    if not image_root.is_dir():
        raise FileNotFoundError(f"frame directory {image_root} not found; {_DOWNLOAD_HINT}")
    split_videos = {
        "train": videos[: len(videos) - val_videos],
        "validation": videos[len(videos) - val_videos :],
    }
    settings = {
        "size": size,
        "videos_per_shard": videos_per_shard,
        "val_videos": val_videos,
        "resample": resample,
        "num_videos": len(videos),
    }
    previous = prepare_output_dir(output_dir, DATASET, settings, overwrite)

    result = ConversionResult(skipped=list(previous.get("skipped", [])))
    summaries = dict(previous.get("splits", {}))

    def save_info(complete: bool) -> None:
        info: dict[str, Any] = {"dataset": DATASET, "settings": settings, "splits": summaries}
        info |= {"skipped": result.skipped, "complete": complete}
        write_json_atomic(output_dir / f"{DATASET}-info.json", info)

    for split in splits:
        plan = plan_shards(output_dir, DATASET, split, split_videos[split], videos_per_shard)
        todo = [(path, chunk) for path, chunk in plan if not path.exists()]
        result.kept_shards += len(plan) - len(todo)
        redo = {v["id"] for _, chunk in todo for v in chunk}
        result.skipped = [
            s for s in result.skipped if s["split"] != split or s["video_id"] not in redo
        ]
        tasks = (
            _Task(v, tuple(annotations[v["id"]]), image_root, size, resample)
            for _, chunk in todo
            for v in chunk
        )
        total = len(split_videos[split])
        done = total - sum(len(chunk) for _, chunk in todo)
        with tqdm(
            total=total, initial=done, desc=f"ytvis {split}", unit="video", disable=not progress
        ) as bar:
            converted = ordered_map(_try_convert, tasks, workers)
            for path, chunk in todo:
                samples = _accept(
                    islice(converted, len(chunk)), split, skip_bad, result.skipped, bar
                )
                write_shard(path, samples)
        result.splits[split] = summarize_shards(path for path, _ in plan)
        summaries[split] = result.splits[split].as_dict()
        save_info(complete=False)
    save_info(complete=True)
    return result


def _accept(
    results: Iterable, split: str, skip_bad: bool, skipped: list[dict], bar: tqdm
) -> Iterator[dict]:
    """Pass converted samples on; record bad videos (skip_bad) or raise on the first one."""
    for converted in results:
        bar.update(1)
        if isinstance(converted, BadVideoError):
            if not skip_bad:
                raise BadVideoError(
                    converted.video_id,
                    converted.name,
                    f"{converted.reason}; fix or remove it, or pass --skip-bad to leave it out",
                )
            skipped.append(
                {
                    "split": split,
                    "video_id": converted.video_id,
                    "name": converted.name,
                    "reason": converted.reason,
                }
            )
            continue
        yield converted
