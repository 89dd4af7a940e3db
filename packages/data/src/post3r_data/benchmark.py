"""Throughput of the data package: loader clips/s by worker count, synthetic videos/s.

`uv run apps/bench-data` renders a temporary synthetic dataset (timing the renderer), writes a
few YouTube-VIS-sized videos (random pixels, 518 px short side), and streams training clips
from both with 0, 1 and 2 DataLoader workers. Ratios are against the first row of each table,
measured in the same run. `--data-dir D --dataset ytvis` streams real shards instead.
"""

from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from post3r_data.loader import make_train_loader
from post3r_data.shards import (
    NpyMember,
    encode_npy,
    find_shards,
    member_file,
    read_local_shard,
    shard_name,
    write_shard,
)
from post3r_data.synth import generate_synthetic_dataset


def _clips_per_second(shards: list[str], workers: int, args: argparse.Namespace) -> float:
    warmup = 2
    loader = make_train_loader(
        shards,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        resolution=args.resolution,
        num_workers=workers,
        steps_per_epoch=warmup + args.batches,
        shuffle_buffer=16,
        frames_dtype=torch.float32 if args.float_frames else torch.uint8,
    )
    batches = iter(loader)
    for _ in range(warmup):  # worker start-up and the shuffle buffer's first fill
        next(batches)
    start = time.perf_counter()
    for _ in batches:
        pass
    return args.batches * args.batch_size / (time.perf_counter() - start)


def _loader_table(title: str, shards: list[str], args: argparse.Namespace) -> None:
    print(f"\n{title}")
    dtype = "float32" if args.float_frames else "uint8"
    print(
        f"  batch {args.batch_size}, {args.chunk_size}-frame clips at {args.resolution} px, "
        f"{dtype} frames"
    )
    print(f"  {'workers':>7}  {'clips/s':>9}  {'vs 0 workers':>12}")
    baseline = None
    for workers in args.workers:
        rate = _clips_per_second(shards, workers, args)
        baseline = baseline or rate
        print(f"  {workers:>7}  {rate:>9.1f}  {rate / baseline:>11.2f}x")


def _synthetic_table(root: Path, args: argparse.Namespace) -> list[str]:
    print(f"\nsynthetic rendering: {args.videos} videos of {args.frames} frames at {args.size} px")
    print(f"  {'processes':>9}  {'videos/s':>9}  {'vs 1 process':>12}")
    baseline = None
    for workers in (1, 2):
        out = root / f"synthetic-{workers}"
        result = generate_synthetic_dataset(
            out,
            args.videos,
            args.size,
            args.frames,
            seed=0,
            num_val_videos=1,
            videos_per_shard=max(1, args.videos // 4),
            workers=workers,
            progress=False,
        )
        rate = result.videos_per_second
        baseline = baseline or rate
        print(f"  {workers:>9}  {rate:>9.1f}  {rate / baseline:>11.2f}x")
    return find_shards(root / "synthetic-1", "synthetic", "train")


def _ytvis_like_shards(root: Path, videos: int) -> list[str]:
    """Videos the size of converted YouTube-VIS ones: 24 frames of 518 x 920, 3 instances."""
    rng = np.random.default_rng(0)
    paths = []
    for index in range(videos):
        pixels = rng.integers(0, 256, (24, 518, 920, 3), dtype=np.uint8)
        masks = np.zeros((24, 518, 920, 3), np.uint8)
        for i in range(3):
            masks[:, 100 * i : 100 * i + 150, 200 * i : 200 * i + 300, i] = 5 + i
        sample = {
            "__key__": f"{index}",
            "video.npy": encode_npy(pixels),
            "segmentations.npy": encode_npy(masks),
        }
        path = root / shard_name("ytvis", "train", index)
        write_shard(path, [sample])
        paths.append(str(path))
    return paths


def _decode_table(shards: list[str], chunk_size: int) -> None:
    """Cutting one clip out of a whole-video sample: read and load everything (SlotContrast's
    way) versus seeking to the clip's frames (`read_local_shard` + `NpyMember`)."""

    def whole() -> np.ndarray:
        with tarfile.open(shards[0]) as tar:
            member = next(m for m in tar if m.name.endswith(".video.npy"))
            data = io.BytesIO(member_file(tar, member).read())
            return np.load(data, allow_pickle=False)[:chunk_size].copy()

    def seek() -> np.ndarray:
        samples = read_local_shard(shards[0], lambda field: field == "video.npy")
        video = NpyMember(next(samples)["video.npy"])  # valid while `samples` is open
        clip = video[:chunk_size].copy()
        samples.close()
        return clip

    assert np.array_equal(whole(), seek())
    times = {}
    for name, function in (("whole", whole), ("seek", seek)):
        start = time.perf_counter()
        for _ in range(10):
            function()
        times[name] = (time.perf_counter() - start) / 10 * 1e3
    print(f"\ncutting a {chunk_size}-frame clip out of a whole-video sample")
    print(f"  read + np.load the whole video  {times['whole']:7.2f} ms   (baseline)")
    speedup = times["whole"] / times["seek"]
    print(f"  seek to the clip's frames       {times['seek']:7.2f} ms   {speedup:.1f}x faster")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apps/bench-data", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="stream real shards from here instead")
    parser.add_argument("--dataset", default="ytvis", help="shard prefix in --data-dir")
    parser.add_argument("--videos", type=_positive, default=96, help="synthetic videos to render")
    parser.add_argument("--size", type=_positive, default=64, help="synthetic image side")
    parser.add_argument("--frames", type=_positive, default=8, help="synthetic frames per video")
    parser.add_argument(
        "--ytvis-videos", type=_non_negative, default=6, help="YT-VIS-sized videos (0: none)"
    )
    parser.add_argument("--batch-size", type=_positive, default=8)
    parser.add_argument("--chunk-size", type=_positive, default=4)
    parser.add_argument("--resolution", type=int, default=None, help="default: --size")
    parser.add_argument("--batches", type=_positive, default=20, help="timed batches per row")
    parser.add_argument("--workers", type=_non_negative, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--float-frames", action="store_true", help="float32 frames (default uint8, 4x smaller)"
    )
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as error:  # what the arguments led to: a usage error
        parser.error(str(error))


def _run(args: argparse.Namespace) -> int:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.data_dir is not None:
        args.resolution = args.resolution or 518
        shards = find_shards(args.data_dir, args.dataset, "train")
        _decode_table(shards, args.chunk_size)
        _loader_table(f"training clips from {args.data_dir}", shards, args)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        root = Path(tmp)
        synthetic = _synthetic_table(root, args)
        resolution = args.resolution
        args.resolution = resolution or args.size
        _loader_table("training clips from synthetic shards (all fields)", synthetic, args)
        if args.ytvis_videos > 0:
            ytvis = _ytvis_like_shards(root, args.ytvis_videos)
            _decode_table(ytvis, args.chunk_size)
            args.resolution = resolution or 518
            _loader_table(
                "training clips from YouTube-VIS-sized shards (518 px crops)", ytvis, args
            )
    return 0
