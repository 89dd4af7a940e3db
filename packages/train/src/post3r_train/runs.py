"""Loading a trained run back: its config, its model and its checkpoint's trainable weights."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from post3r_train.config import ConfigError, load_config

if TYPE_CHECKING:  # the model (torch, timm) is imported when a run is loaded
    from post3r_train.model import POST3RModel


def run_config_path(run_or_checkpoint: Path) -> Path | None:
    """config.yaml of a run directory, or of the run a checkpoint file lies in."""
    path = Path(run_or_checkpoint)
    for folder in (path, *path.parents[:3]):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def load_run(
    run_or_checkpoint: str | Path,
    *,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    data_dir: str | Path | None = None,
) -> tuple[DictConfig, POST3RModel, Path]:
    """(config, model with the checkpoint's weights, checkpoint path) of a run directory or a
    checkpoint file. The config is the run's config.yaml unless `config` is given."""
    from post3r_train.engine import find_checkpoint, read_checkpoint
    from post3r_train.model import POST3RModel

    path = Path(run_or_checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run directory or checkpoint file")
    checkpoint = find_checkpoint(path)
    if config is None:
        config = run_config_path(path)
        if config is None:
            raise ConfigError(
                f"{path} has no config.yaml next to it (a run directory keeps one); "
                "pass --config CONFIG"
            )
    overrides = list(overrides)
    if data_dir is not None:
        overrides.append(f"dataset.root={data_dir}")
    cfg: DictConfig = load_config(config, overrides)
    model = POST3RModel.from_config(cfg)
    model.load_trainable_state_dict(read_checkpoint(checkpoint)["model"], source=str(checkpoint))
    return cfg, model.eval(), checkpoint
