"""Data for training: the cached synthetic default and the loaders handed to the engine.

`prepare_data(cfg)` returns the shard directory, generating the synthetic dataset there first
when `dataset.name=synthetic` and it is missing or unfinished (finished shards are kept, so an
interrupted generation resumes; a file lock keeps concurrent processes from racing).
`build_loaders(cfg, root)` wraps post3r_data's WebDataset loaders as the engine's factories.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from post3r_train.config import frame_size

log = logging.getLogger("post3r_train")

DEFAULT_DATA_DIR = Path("data")


def synthetic_settings(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg.dataset.synthetic, resolve=True)  # type: ignore[return-value]


def default_synthetic_root(cfg: DictConfig) -> Path:
    """./data/synthetic-<8 hex digits of the generation settings>: one cache per setting."""
    text = json.dumps(synthetic_settings(cfg), sort_keys=True)
    return DEFAULT_DATA_DIR / f"synthetic-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def data_root(cfg: DictConfig) -> Path:
    if cfg.dataset.root is not None:
        return Path(cfg.dataset.root).expanduser()
    if cfg.dataset.name == "synthetic":
        return default_synthetic_root(cfg)
    raise FileNotFoundError(
        f"no data directory for dataset.name={cfg.dataset.name}: pass --data-dir DIR "
        f"(the folder holding {cfg.dataset.name}-train-000000.tar, ...)"
    )


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".generate.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _complete(root: Path) -> bool:
    info = root / "synthetic-info.json"
    try:
        return bool(json.loads(info.read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def prepare_data(cfg: DictConfig, progress: bool = True) -> Path:
    """The shard directory, with the synthetic dataset generated into it if needed."""
    root = data_root(cfg)
    if cfg.dataset.name != "synthetic":
        if not root.is_dir():
            raise FileNotFoundError(
                f"data directory {root} does not exist: pass --data-dir DIR (the folder holding "
                f"{cfg.dataset.name}-train-000000.tar, ...)"
            )
        return root
    if _complete(root) and cfg.dataset.root is None:
        return root
    from post3r_data.synth import SynthConfig, generate_synthetic_dataset

    s = cfg.dataset.synthetic
    scene = SynthConfig(
        min_objects=s.min_objects,
        max_objects=s.max_objects,
        shapes=tuple(s.shapes),
        textures=s.textures,
        texture_contrast=s.texture_contrast,
        object_motion=s.object_motion,
        camera_motion=s.camera_motion,
        shadows=s.shadows,
        random_lighting=s.random_lighting,
        fov_degrees=s.fov_degrees,
    )
    with _locked(root):
        if not _complete(root):
            log.info("generating the synthetic dataset into %s (once; it is cached)", root)
        result = generate_synthetic_dataset(
            root,
            s.num_train_videos,
            size=s.resolution,
            frames=s.num_frames,
            seed=s.seed,
            num_val_videos=s.num_val_videos,
            videos_per_shard=s.videos_per_shard,
            config=scene,
            workers=min(4, len(os.sched_getaffinity(0))),
            progress=progress,
        )
    if result.rendered_videos:
        log.info(
            "rendered %d synthetic videos in %.0f s into %s",
            result.rendered_videos,
            result.seconds,
            root,
        )
    return root


@dataclass
class Loaders:
    """The engine's factories: `train(start)` -> this rank's batches from position `start` (in
    batches; one pass is one loader epoch, the engine asks again for the next); `val()` -> this
    rank's share of the validation set. Both loaders count skipped corrupt samples
    (`num_skipped`), which the engine reports."""

    train: Callable[[int], Iterable[dict]]
    val: Callable[[], Iterable[dict]]


def build_loaders(cfg: DictConfig, root: Path) -> Loaders:
    """Loaders over `<root>/<dataset.name>-{train,validation}-NNNNNN.tar`; with
    `model.teacher.name=cached` they also deliver the teacher cache's maps at the pointmap
    decoder's resolution (check the cache first: `teacher_cache.check_teacher_cache`)."""
    from post3r_data import find_shards, make_train_loader, make_val_loader
    from post3r_data.teacher_cache import TeacherCacheSpec

    d = cfg.dataset
    train_shards = find_shards(root, d.name, "train")
    val_shards = find_shards(root, d.name, "validation")
    size = frame_size(cfg)
    # One loader "epoch" per checkpoint interval: resuming from a checkpoint starts an epoch.
    epoch = cfg.trainer.checkpoint_every_n_steps * cfg.trainer.accumulate_grad_batches
    pin = cfg.trainer.accelerator != "cpu"
    teacher = None
    if cfg.model.teacher.name == "cached":
        from post3r_train.teacher_cache import cache_dir

        resolution = tuple(int(x) for x in cfg.model.decoder_resolution)
        teacher = TeacherCacheSpec(cache_dir(cfg, root), resolution)

    def train(start: int) -> Iterable[dict]:
        return make_train_loader(
            train_shards,
            batch_size=d.batch_size,
            chunk_size=d.chunk_size,
            resolution=size,
            num_workers=d.num_workers,
            seed=cfg.seed,
            start_step=start,
            steps_per_epoch=epoch,
            shuffle_buffer=d.shuffle_buffer,
            frames_dtype=torch.uint8,
            pin_memory=pin,
            teacher_cache=teacher,
        )

    def val() -> Iterable[dict]:
        return make_val_loader(
            val_shards,
            resolution=size,
            batch_size=d.val_batch_size,
            chunk_size=d.val_chunk_size,
            num_workers=min(d.num_workers, len(val_shards)),
            frames_dtype=torch.uint8,
            pin_memory=pin,
            teacher_cache=teacher,
        )

    return Loaders(train, val)
