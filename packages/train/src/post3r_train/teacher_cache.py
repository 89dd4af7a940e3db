"""`uv run apps/cache-teacher CONFIG --data-dir D [--output DIR] [key=value ...]`: the frozen
TTT3R teacher, run once over every whole video, stored as sidecar shards; and the check that a
training run's cache is there, complete and made by the run's teacher.

Each video is streamed from its first frame with the state carried across all its frames (one
reset per video), on the whole frame resized to `model.teacher.image_size` on the long side
(sides multiples of the patch size, the aspect ratios the released model was trained on). Per
frame, the world pointmap and confidence (resized to the stored resolution) and the pose are
appended to temporary files, so memory does not grow with the video's length. Shards are split
over ranks (`trainer.devices=N`, torchrun, SLURM), written atomically, and a finished shard is
skipped when the build is run again (resume). The format is post3r_data.teacher_cache's.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from post3r_backbone.allocator import keep_freed_memory_for
from post3r_train.config import ConfigError, load_config
from post3r_train.console import CONSOLE_ERRORS, report_error
from post3r_train.errors import TeacherCacheError

log = logging.getLogger("post3r_train")

DEFAULT_CACHE_NAME = "teacher-cache"
STORAGE = {"pointmap": "float16", "confidence": "float16", "camera_to_world": "float32"}
SPLITS = ("train", "validation")


# ------------------------------------------------------------------------------------------
# What a cache is made of


def cache_dir(cfg: DictConfig, data_root: Path) -> Path:
    """`model.teacher.cache`, or `<data_root>/teacher-cache` (where cache-teacher writes)."""
    if cfg.model.teacher.cache is not None:
        return Path(cfg.model.teacher.cache).expanduser()
    return Path(data_root) / DEFAULT_CACHE_NAME


def stored_short_side(cfg: DictConfig) -> int:
    """The stored maps' short side: `model.teacher.cache_resolution`, or enough for the decoder
    after the training crop (the short side's square crop: max(model.decoder_resolution))."""
    t = cfg.model.teacher
    return int(t.cache_resolution or max(cfg.model.decoder_resolution))


def checkpoint_identity(cfg: DictConfig) -> dict[str, Any] | None:
    """File name, size and SHA-256 of the first and last MiB of the teacher checkpoint; None
    for random weights. A missing file gives its name alone (a run reading the cache does not
    need the checkpoint)."""
    from post3r_data.teacher_cache import file_fingerprint

    t = cfg.model.teacher
    if t.checkpoint is None:
        return None
    path = Path(t.checkpoint).expanduser()
    identity: dict[str, Any] = {"file": path.name}
    if path.is_file():
        identity.update(file_fingerprint(path))
    return identity


def cache_settings(cfg: DictConfig) -> dict[str, Any]:
    """What makes a cache's values: compared field by field before training."""
    from post3r_data.teacher_cache import FORMAT_VERSION

    t = cfg.model.teacher
    return {
        "format": FORMAT_VERSION,
        "dataset": cfg.dataset.name,
        "checkpoint": checkpoint_identity(cfg),
        "random_weights": bool(t.checkpoint is None and t.random_weights),
        "preset": t.preset if t.checkpoint is None else None,
        "update_rule": t.update_rule,
        "input_long_side": int(t.image_size),
        "stored_short_side": stored_short_side(cfg),
        "storage": STORAGE,
    }


def input_size(height: int, width: int, long_side: int, multiple: int) -> tuple[int, int]:
    """The teacher's input (H, W): `long_side` on the long side, the short side keeping the
    aspect ratio, both rounded to a multiple of the patch size."""

    def rounded(value: float) -> int:
        return max(multiple, round(value / multiple) * multiple)

    scale = long_side / max(height, width)
    return rounded(height * scale), rounded(width * scale)


def data_shards(data_root: Path, dataset: str) -> list[str]:
    """Every train and validation shard of the dataset, in one sorted list."""
    from post3r_data import find_shards

    return [shard for split in SPLITS for shard in find_shards(data_root, dataset, split)]


def build_command(
    config: str | None, overrides: Sequence[str], data_root: Path, output: Path | None
) -> str:
    """The exact `uv run apps/cache-teacher ...` that builds a run's cache."""
    parts = ["uv", "run", "apps/cache-teacher", config or "default", "--data-dir", str(data_root)]
    if output is not None and output != Path(data_root) / DEFAULT_CACHE_NAME:
        parts += ["--output", str(output)]
    parts += [o for o in overrides if not o.startswith("dataset.root=")]
    return shlex.join(parts)


# ------------------------------------------------------------------------------------------
# Checking a cache before training


def check_run_cache(
    cfg: DictConfig, data_root: Path, config: str | None, overrides: Sequence[str]
) -> None:
    """For a `model.teacher.name=cached` run (given as its `config` and `overrides`), check its
    cache (`check_teacher_cache`) with the command that builds it; other runs need none."""
    if cfg.model.teacher.name == "cached":
        command = build_command(config, overrides, data_root, cache_dir(cfg, data_root))
        check_teacher_cache(cfg, data_root, command)


def check_teacher_cache(cfg: DictConfig, data_root: Path, command: str) -> Path:
    """The cache directory of a `model.teacher.name=cached` run, after checking that every data
    shard has a finished sidecar shard made from the same data by the run's teacher settings.
    Raises TeacherCacheError naming what is missing or mismatching and `command`, the exact
    command that (re)builds it."""
    from post3r_data.teacher_cache import CACHE_INFO, read_record, sidecar_path

    directory = cache_dir(cfg, data_root)
    hint = f"build it with: {command}"
    info_path = directory / CACHE_INFO
    if not info_path.is_file():
        raise TeacherCacheError(f"no teacher cache at {directory} (no {CACHE_INFO}); {hint}")
    try:
        recorded = json.loads(info_path.read_text())["settings"]
    except (OSError, ValueError, KeyError) as error:
        raise TeacherCacheError(f"{info_path} is unreadable ({error}); {hint}") from None
    expected = cache_settings(cfg)
    # Any stored resolution that covers the decoder after the crop will do.
    expected["stored_short_side"] = max(int(x) for x in cfg.model.decoder_resolution)
    _compare_settings(recorded, expected, directory, hint)
    missing = []
    for shard in data_shards(data_root, cfg.dataset.name):
        sidecar = sidecar_path(directory, shard)
        record = read_record(sidecar)
        if record is None or not sidecar.is_file():
            missing.append(Path(shard).name)
            continue
        _compare_shard(shard, sidecar, record, hint)
    if missing:
        raise TeacherCacheError(
            f"the teacher cache at {directory} is unfinished: {len(missing)} data shard(s) have "
            f"no finished sidecar shard ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}); resume it with: {command}"
        )
    return directory


def _compare_settings(recorded: dict, expected: dict, directory: Path, hint: str) -> None:
    for key, value in expected.items():
        have = recorded.get(key)
        if key == "checkpoint" and value is not None and have is not None and "size" not in value:
            have = {"file": have.get("file")}  # the run's checkpoint file is not here: name only
        if key == "stored_short_side":
            if have is None or have < value:
                raise TeacherCacheError(
                    f"the teacher cache at {directory} is stale: its stored resolution "
                    f"(short side {have}) is below what the run needs ({value}, from "
                    f"model.decoder_resolution); {hint} "
                    f"model.teacher.cache_resolution={value} --overwrite"
                )
            continue
        if have != value:
            raise TeacherCacheError(
                f"the teacher cache at {directory} is stale: {key} is {have!r} in the cache but "
                f"{value!r} for this run; rebuild it into another --output, or {hint} --overwrite"
            )


def _compare_shard(shard: str, sidecar: Path, record: dict, hint: str) -> None:
    from post3r_data.teacher_cache import file_fingerprint, shard_keys

    name = Path(shard).name
    if record.get("data") != file_fingerprint(shard):
        cached = [key for key, _ in record.get("videos", [])]
        new = sorted(set(shard_keys(shard)) - set(cached))
        videos = f"; videos without a cache entry: {', '.join(new[:10])}" if new else ""
        raise TeacherCacheError(
            f"the teacher cache is stale: data shard {name} changed since its sidecar shard was "
            f"made{videos}; {hint}"
        )
    if sidecar.stat().st_size != record.get("bytes"):
        raise TeacherCacheError(
            f"sidecar shard {sidecar} does not match its record (size {sidecar.stat().st_size} "
            f"instead of {record.get('bytes')}); delete it and its .json, then {hint}"
        )


# ------------------------------------------------------------------------------------------
# Building a cache


@dataclass
class CacheSummary:
    """What one process wrote (or found finished)."""

    shards_written: int = 0
    shards_kept: int = 0
    videos: int = 0
    frames: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def describe(self) -> str:
        rate = self.frames / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.shards_written} shards written ({self.shards_kept} already finished), "
            f"{self.videos} videos, {self.frames} frames, {self.bytes / 1e9:.3f} GB, "
            f"{rate:.1f} frames/s"
        )


class _Teacher:
    """The frozen backbone with the input and output geometry of the cache."""

    def __init__(self, cfg: DictConfig, device: torch.device, precision: str) -> None:
        from post3r_train.teacher import TTT3RTeacher

        t = cfg.model.teacher
        torch.manual_seed(0)  # random weights (tests) are the same in every process
        online = TTT3RTeacher(
            t.checkpoint,
            preset=t.preset,
            random_weights=t.random_weights,
            update_rule=t.update_rule,
        )
        self.backbone = online.backbone.to(device)
        self.device, self.precision = device, precision
        self.long_side, self.short_side = int(t.image_size), stored_short_side(cfg)
        self.outputs = ["pts3d_world", "conf_world", "camera_to_world"]

    @torch.inference_mode()
    def video(self, frames, spool, progress) -> None:
        """Stream every frame of `frames` (T, H, W, 3) uint8, lazily indexable, into `spool`."""
        from post3r_data.teacher_cache import stored_size

        num_frames, height, width = frames.shape[:3]
        size = input_size(height, width, self.long_side, self.backbone.config.patch_size)
        stored = stored_size(height, width, self.short_side)
        state = self.backbone.init_state(1)  # the one reset of this video
        dtype = torch.bfloat16 if self.precision == "bf16" else None
        for t in range(num_frames):
            frame = torch.from_numpy(np.array(frames[t : t + 1])).to(self.device)
            frame = frame.permute(0, 3, 1, 2).float() / 255
            frame = F.interpolate(frame, size=size, mode="bilinear", antialias=True).clamp(0, 1)
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                out, state = self.backbone.step(frame, state, outputs=self.outputs)
            assert out.pts3d_world is not None and out.conf_world is not None  # in self.outputs
            assert out.camera_to_world is not None
            points = _nearest(out.pts3d_world.float().permute(0, 3, 1, 2), stored)
            confidence = _nearest(out.conf_world.float()[:, None], stored)
            spool.add(
                points[0].permute(1, 2, 0).cpu().numpy(),
                confidence[0, 0].cpu().numpy(),
                out.camera_to_world[0].float().cpu().numpy(),
            )
            progress.update(1)


def _nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="nearest-exact")


def _cache_shard(teacher: _Teacher, shard: str, sidecar: Path, progress) -> dict[str, Any]:
    """Write one sidecar shard (atomically) and return its record."""
    from post3r_data.shards import NpyMember, read_local_shard
    from post3r_data.teacher_cache import SidecarShardWriter, file_fingerprint, stored_size

    with SidecarShardWriter(sidecar) as writer:
        for sample in read_local_shard(shard, lambda field: field == "video.npy"):
            if "video.npy" not in sample:
                raise ValueError(f"sample {sample['__key__']!r} of {shard} has no video.npy")
            frames = NpyMember(sample["video.npy"])
            if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
                raise ValueError(
                    f"sample {sample['__key__']!r} of {shard}: video.npy must be uint8 "
                    f"(T, H, W, 3), got {frames.dtype} {frames.shape}"
                )
            height, width = frames.shape[1:3]
            size = stored_size(height, width, teacher.short_side)
            spool = writer.begin_video(sample["__key__"], frames.shape[0], size)
            teacher.video(frames, spool, progress)
            writer.end_video()
    videos = [list(video) for video in writer.videos]
    return {
        "data_shard": Path(shard).name,
        "data": file_fingerprint(shard),
        "videos": videos,
        "frames": sum(frames for _, frames in videos),
        "bytes": sidecar.stat().st_size,
        "precision": teacher.precision,  # '32' or 'bf16' autocast: how these values were made
    }


def _finished(shard: str, sidecar: Path) -> dict[str, Any] | None:
    """The record of a sidecar shard that is finished and made from this data shard."""
    from post3r_data.teacher_cache import file_fingerprint, read_record

    record = read_record(sidecar)
    if record is None or not sidecar.is_file() or sidecar.stat().st_size != record.get("bytes"):
        return None
    return record if record.get("data") == file_fingerprint(shard) else None


def prepare_output(output: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Make `output` ready for a cache with `settings`: a cache made with other settings is
    refused (its shards would mix with the new ones) unless `overwrite`, which deletes it."""
    from post3r_data.teacher_cache import CACHE_INFO
    from post3r_train.atomic import atomic_write_text

    info_path = output / CACHE_INFO
    if info_path.is_file():
        try:
            previous = json.loads(info_path.read_text()).get("settings")
        except ValueError:
            previous = None
        if previous != settings:
            if not overwrite:
                changed = sorted(k for k in settings if (previous or {}).get(k) != settings[k])
                raise TeacherCacheError(
                    f"{output} holds a teacher cache made with other settings (differing: "
                    f"{', '.join(changed) or 'unreadable'}); choose another --output or pass "
                    "--overwrite to delete it"
                )
            for path in output.glob("*.tar*"):
                path.unlink()
    output.mkdir(parents=True, exist_ok=True)
    # Every rank writes the same content (through its own temporary file): no ordering needed.
    text = json.dumps({"settings": settings}, indent=2, sort_keys=True) + "\n"
    atomic_write_text(info_path, text)


def build_cache(
    cfg: DictConfig,
    data_root: Path,
    output: Path,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    precision: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> CacheSummary:
    """Cache this rank's share of the shards (shard i goes to rank i % world_size); finished
    shards are kept. `precision`: '32' or 'bf16' (default: bf16 on a GPU, else 32)."""
    from tqdm import tqdm

    from post3r_data import summarize_shards
    from post3r_data.teacher_cache import sidecar_path, write_record

    started = time.monotonic()
    device = device or torch.device("cpu")
    precision = precision or ("bf16" if device.type == "cuda" else "32")
    if Path(output).resolve() == Path(data_root).resolve():
        raise ValueError(
            f"--output {output} is the data directory: the sidecar shards have the data shards' "
            "names and would replace them; choose another folder (default: D/teacher-cache)"
        )
    shards = data_shards(data_root, cfg.dataset.name)
    settings = cache_settings(cfg)
    if settings["checkpoint"] is not None and "size" not in settings["checkpoint"]:
        raise FileNotFoundError(
            f"TTT3R checkpoint {cfg.model.teacher.checkpoint} not found: set "
            "model.teacher.checkpoint=PATH (see packages/backbone/README.md)"
        )
    prepare_output(output, settings, overwrite)
    summary = CacheSummary()
    todo = []
    for shard in shards[rank::world_size]:
        record = _finished(shard, sidecar_path(output, shard))
        if record is None:
            todo.append(shard)
            continue
        summary.shards_kept += 1
    teacher = _Teacher(cfg, device, precision) if todo else None
    total = summarize_shards(todo).frames if todo else 0
    with tqdm(
        total=total, unit="frame", desc=f"cache-teacher rank {rank}", disable=not progress
    ) as bar:
        for shard in todo:
            sidecar = sidecar_path(output, shard)
            assert teacher is not None  # built whenever there is a shard to do
            record = _cache_shard(teacher, shard, sidecar, bar)
            write_record(sidecar, record)
            summary.shards_written += 1
            summary.videos += len(record["videos"])
            summary.frames += record["frames"]
            summary.bytes += record["bytes"]
    summary.seconds = time.monotonic() - started
    return summary


# ------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apps/cache-teacher",
        description="Run the frozen TTT3R teacher of a run config once over every whole video of "
        "the train and validation shards, into sidecar shards that training reads "
        "(model.teacher.name=cached).",
    )
    parser.add_argument(
        "items", nargs="*", metavar="CONFIG [key=value ...]", help="the run config, then overrides"
    )
    parser.add_argument("--data-dir", type=Path, required=True, help="the data shards' folder")
    parser.add_argument(
        "--output",
        type=Path,
        help="cache folder (default: model.teacher.cache, else D/teacher-cache)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--precision", choices=("auto", "32", "bf16"), default="auto", help="auto: bf16 on a GPU"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="delete a cache made with other settings"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from post3r_train.cli import split_items
    from post3r_train.engine.distributed import launched_world, select_device
    from post3r_train.engine.launch import launch_local, needs_launch

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    try:
        config, overrides = split_items(args.items)
        if config is None:
            raise ConfigError("give the run config first (e.g. ytvis2021)")
        cfg = load_config(config, [*overrides, f"dataset.root={args.data_dir}"])
    except ConfigError as error:
        parser.error(str(error))
    if needs_launch(cfg.trainer.devices):
        return launch_local(cfg.trainer.devices, argv, module="post3r_train.teacher_cache")
    rank, local_rank, world_size = launched_world()
    accelerator = {"auto": "auto", "cpu": "cpu", "cuda": "gpu"}[args.device]
    output = args.output or cache_dir(cfg, args.data_dir)
    try:
        device = select_device(accelerator, local_rank)
        if cfg.trainer.cpu_keep_freed_memory:  # each frame re-allocates the same large maps
            keep_freed_memory_for(device)
        summary = build_cache(
            cfg,
            args.data_dir,
            output,
            rank=rank,
            world_size=world_size,
            device=device,
            precision=None if args.precision == "auto" else args.precision,
            overwrite=args.overwrite,
            progress=not args.quiet and rank == 0,
        )
    except CONSOLE_ERRORS as error:
        return report_error(error)
    who = f"rank {rank}/{world_size}: " if world_size > 1 else ""
    print(f"{who}{summary.describe()} into {output}")
    return 0


if __name__ == "__main__":  # the workers of trainer.devices=N
    logging.basicConfig(level=logging.INFO)
    raise SystemExit(main())
