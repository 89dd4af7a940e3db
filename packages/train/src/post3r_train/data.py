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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

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
    """The engine's factories: `train(start)` -> batches from position `start` of this rank's
    stream; `val()` -> this rank's share of the validation set."""

    train: Any
    val: Any


def _batches(loader: Iterable[dict]) -> Iterator[dict]:
    yield from loader
