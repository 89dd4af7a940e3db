"""Data for training: the cached synthetic default and the loaders handed to the engine.

`prepare_data(cfg)` returns the shard directory, generating the synthetic dataset there first
when `dataset.name=synthetic` and it is missing or unfinished (finished shards are kept, so an
interrupted generation resumes; a file lock keeps concurrent processes from racing).
`build_loaders(cfg, root, batches_per_epoch=...)` wraps post3r_data's WebDataset loaders as the
engine's factories (`build_train_loader`, `build_val_loader` each on its own).
`existing_validation_data(cfg)` is the evaluation side: it finds the validation shards and never
generates any (a typo'd --data-dir is an error, not a new dataset).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf

from post3r_train.config import frame_size

if TYPE_CHECKING:  # post3r_data is imported when data is needed
    from post3r_data import SynthConfig
    from post3r_data.teacher_cache import TeacherCacheSpec

log = logging.getLogger("post3r_train")

DEFAULT_DATA_DIR = Path("data")


def synthetic_settings(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg.dataset.synthetic, resolve=True)  # type: ignore[return-value]


def scene_config(cfg: DictConfig) -> SynthConfig:
    """post3r_data's `SynthConfig` from `dataset.synthetic`, whose scene knobs are its fields
    under the same names (the rest say how many videos to render, and how)."""
    from post3r_data import SynthConfig

    scene_fields = {f.name for f in dataclasses.fields(SynthConfig)}
    settings: dict[str, Any] = synthetic_settings(cfg)
    knobs: dict[str, Any] = {
        name: tuple(value) if isinstance(value, list) else value
        for name, value in settings.items()
        if name in scene_fields
    }
    return SynthConfig(**knobs)


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


# synthetic-info.json's "settings" -> dataset.synthetic keys (scene knobs sit under "config").
_RECORDED_KEYS = {
    "num_videos": "num_train_videos",
    "num_val_videos": "num_val_videos",
    "size": "resolution",
    "frames": "num_frames",
    "seed": "seed",
    "videos_per_shard": "videos_per_shard",
}


def recorded_synthetic_settings(root: Path) -> dict[str, Any] | None:
    """The dataset.synthetic values a finished synthetic dataset in `root` was generated with
    (apps/synth or an earlier run record them in synthetic-info.json), or None."""
    if not _complete(root):
        return None
    settings = json.loads((root / "synthetic-info.json").read_text()).get("settings") or {}
    values = {
        ours: settings[theirs] for theirs, ours in _RECORDED_KEYS.items() if theirs in settings
    }
    values |= dict(settings.get("config") or {})
    return values


def adopt_recorded_dataset(cfg: DictConfig, explicit: Iterable[str] = ()) -> DictConfig:
    """`cfg` with dataset.synthetic set to what the synthetic dataset at `dataset.root` records,
    so `--data-dir <apps/synth output>` trains on it as it is. `explicit` are the user's
    key=value overrides: one that contradicts the dataset is an error, not silently replaced."""
    if cfg.dataset.name != "synthetic" or cfg.dataset.root is None:
        return cfg
    root = Path(cfg.dataset.root).expanduser()
    recorded = recorded_synthetic_settings(root)
    if recorded is None:
        return cfg
    known = {k: v for k, v in recorded.items() if k in cfg.dataset.synthetic}
    asked = {item.split("=", 1)[0].removeprefix("dataset.synthetic.") for item in explicit}
    current = synthetic_settings(cfg)
    clashes = [k for k in known if k in asked and current[k] != known[k]]
    if clashes:
        shown = ", ".join(f"{k}={current[k]} (dataset: {known[k]})" for k in clashes)
        from post3r_train.config import ConfigError

        raise ConfigError(
            f"{root} holds a synthetic dataset made with other settings: {shown}; drop those "
            "overrides to train on it as it is, or pass another --data-dir to generate a new one"
        )
    changed = {k: v for k, v in known.items() if current[k] != v}
    if changed:
        log.info("using the settings recorded in %s: %s", root / "synthetic-info.json", changed)
    adopted = cfg.copy()
    adopted.dataset.synthetic = OmegaConf.merge(cfg.dataset.synthetic, known)
    return adopted


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
    from post3r_data import generate_synthetic_dataset

    s = cfg.dataset.synthetic
    scene = scene_config(cfg)
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


def existing_validation_data(cfg: DictConfig) -> Path:
    """The directory of `cfg`'s validation shards, which must exist: nothing is generated.

    Raises FileNotFoundError naming the directory and how to make the shards.
    """
    from post3r_data import find_shards

    root = data_root(cfg)
    try:
        find_shards(root, cfg.dataset.name, "validation")
    except FileNotFoundError as error:
        hint = ""
        if cfg.dataset.name == "synthetic":
            hint = (
                " (`uv run apps/train` generates the embedded default's dataset into "
                f"{default_synthetic_root(cfg)}; --data-dir must name a folder that holds "
                "synthetic-validation-NNNNNN.tar)"
            )
        raise FileNotFoundError(f"{error}{hint}") from None
    return root


@dataclass
class Loaders:
    """The engine's factories: `train(start)` -> this rank's batches from position `start` (in
    batches; one pass is one loader epoch, the engine asks again for the next); `val()` -> this
    rank's share of the validation set. Both loaders count skipped corrupt samples
    (`num_skipped`), which the engine reports."""

    train: Callable[[int], Iterable[dict]]
    val: Callable[[], Iterable[dict]]


def checkpoint_aligned_epoch(cfg: DictConfig) -> int:
    """Batches per loader epoch such that every checkpoint falls on an epoch boundary
    (`trainer.checkpoint_every_n_steps` x `trainer.accumulate_grad_batches`): a resumed run's
    loader then starts an epoch directly instead of reading and discarding the clips already
    consumed (see post3r_data's `make_train_loader`)."""
    return cfg.trainer.checkpoint_every_n_steps * cfg.trainer.accumulate_grad_batches


def build_loaders(cfg: DictConfig, root: Path, *, batches_per_epoch: int) -> Loaders:
    """Loaders over `<root>/<dataset.name>-{train,validation}-NNNNNN.tar`; the training stream
    has epochs of `batches_per_epoch` batches (e.g. `checkpoint_aligned_epoch(cfg)`). With
    `model.teacher.name=cached` they also deliver the teacher cache's maps at the pointmap
    decoder's resolution (check the cache first: `teacher_cache.check_teacher_cache`)."""
    return Loaders(
        build_train_loader(cfg, root, batches_per_epoch=batches_per_epoch),
        build_val_loader(cfg, root),
    )


def build_train_loader(
    cfg: DictConfig, root: Path, *, batches_per_epoch: int
) -> Callable[[int], Iterable[dict]]:
    """`train(start)`: this rank's training batches from `<root>/<dataset.name>-train-*.tar`,
    from batch `start` on, in loader epochs of `batches_per_epoch` batches."""
    from post3r_data import find_shards, make_train_loader

    d = cfg.dataset
    shards = find_shards(root, d.name, "train")
    size = frame_size(cfg)
    pin = cfg.trainer.accelerator != "cpu"
    teacher = teacher_cache_spec(cfg, root)

    def train(start: int) -> Iterable[dict]:
        return make_train_loader(
            shards,
            batch_size=d.batch_size,
            chunk_size=d.chunk_size,
            resolution=size,
            num_workers=d.num_workers,
            seed=cfg.seed,
            start_step=start,
            steps_per_epoch=batches_per_epoch,
            shuffle_buffer=d.shuffle_buffer,
            frames_dtype=torch.uint8,
            pin_memory=pin,
            teacher_cache=teacher,
        )

    return train


def build_val_loader(cfg: DictConfig, root: Path) -> Callable[[], Iterable[dict]]:
    """`val()`: this rank's share of `<root>/<dataset.name>-validation-*.tar`."""
    from post3r_data import find_shards, make_val_loader

    d = cfg.dataset
    shards = find_shards(root, d.name, "validation")
    size = frame_size(cfg)
    pin = cfg.trainer.accelerator != "cpu"
    teacher = teacher_cache_spec(cfg, root)

    def val() -> Iterable[dict]:
        return make_val_loader(
            shards,
            resolution=size,
            batch_size=d.val_batch_size,
            chunk_size=d.val_chunk_size,
            num_workers=min(d.num_workers, len(shards)),
            frames_dtype=torch.uint8,
            pin_memory=pin,
            teacher_cache=teacher,
        )

    return val


def teacher_cache_spec(cfg: DictConfig, root: Path) -> TeacherCacheSpec | None:
    """Where the loaders read the cached teacher's maps (`model.teacher.name=cached`), at the
    pointmap decoder's resolution; None for the other teachers."""
    if cfg.model.teacher.name != "cached":
        return None
    from post3r_data.teacher_cache import TeacherCacheSpec
    from post3r_train.teacher_cache import cache_dir

    height, width = (int(x) for x in cfg.model.decoder_resolution)
    return TeacherCacheSpec(cache_dir(cfg, root), (height, width))
