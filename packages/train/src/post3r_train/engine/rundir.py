"""The run directory's layout: its paths, its creation, config.yaml and failure logs.

```
<log-dir>/<experiment>/<YYYYmmdd_HHMMSS>/
  config.yaml                 resolved config (rewritten on --continue)
  run.lock                    while a job trains here: its pid, host, start time (runlock.py)
  logs/metrics/metrics.csv    one row per log event: step, then one column per metric
  logs/tensorboard/           scalars and the validation images
  logs/wandb/                 only with --wandb
  logs/failure-rank<N>.txt    the traceback of each failure of rank N (only if one failed)
  results/checkpoints/        last.ckpt, step=NNNNNN.ckpt
  visualizations/step=NNNNNN/ what the module's `visualize` wrote at each validation
```
Only rank 0 writes here, except for the failure logs. The loggers that fill `logs/` are in
`engine/loggers.py`. On resume, log rows after the checkpoint's
step are dropped, so a resumed run's logs read as if it had never stopped.
"""

from __future__ import annotations

import datetime
import logging
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from post3r_train.atomic import atomic_write_text

log = logging.getLogger("post3r_train.engine")
TIMESTAMP = "%Y%m%d_%H%M%S"


@dataclass(frozen=True)
class RunDir:
    """Paths of one run (see the module docstring for the layout)."""

    root: Path

    @classmethod
    def create(cls, log_dir: Path, experiment: str, now: datetime.datetime | None = None) -> RunDir:
        """A new run directory `<log_dir>/<experiment>/<timestamp>[_N]/` with its sub-folders."""
        stamp = (now or datetime.datetime.now()).strftime(TIMESTAMP)
        parent = Path(log_dir) / experiment
        parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(1000):
            root = parent / (stamp if attempt == 0 else f"{stamp}_{attempt}")
            try:
                root.mkdir()
                break
            except FileExistsError:
                continue
        else:
            raise RuntimeError(f"cannot create a fresh run directory under {parent}")
        run = cls(root)
        run.make_folders()
        return run

    def make_folders(self) -> None:
        for folder in (self.metrics_dir, self.tensorboard_dir, self.checkpoints, self.visuals):
            folder.mkdir(parents=True, exist_ok=True)

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def metrics_dir(self) -> Path:
        return self.logs / "metrics"

    @property
    def metrics_csv(self) -> Path:
        return self.metrics_dir / "metrics.csv"

    @property
    def tensorboard_dir(self) -> Path:
        return self.logs / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        return self.root / "results" / "checkpoints"

    @property
    def visuals(self) -> Path:
        return self.root / "visualizations"

    def failure_log(self, rank: int) -> Path:
        return self.logs / f"failure-rank{rank}.txt"

    def save_config(self, config: Any) -> None:
        """config.yaml from a resolved config: an OmegaConf node, a dict or YAML text."""
        atomic_write_text(self.config_path, config_yaml(config))

    def record_failure(self, rank: int, step: int | None) -> None:
        """Append the exception being handled to this rank's failure log, so a run directory
        left without a checkpoint still says why (one file per rank: no rank waits)."""
        path = self.failure_log(rank)
        when = datetime.datetime.now().isoformat(timespec="seconds")
        where = "before its first step" if step is None else f"after step {step}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as file:
                file.write(f"=== {when} rank {rank} failed {where}\n{traceback.format_exc()}\n")
        except OSError:  # e.g. the disk is full: the exception itself still propagates
            return
        log.error("rank %d failed %s; traceback in %s", rank, where, path)


def config_yaml(config: Any) -> str:
    """YAML text of a config given as an OmegaConf node, a dict or YAML text."""
    if isinstance(config, str):
        return config
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(config if OmegaConf.is_config(config) else OmegaConf.create(config))


def run_dir_of_checkpoint(checkpoint: Path) -> RunDir | None:
    """The run directory holding `checkpoint` (…/results/checkpoints/x.ckpt), if it is in one."""
    parents = Path(checkpoint).resolve().parents
    if len(parents) >= 3 and parents[0].name == "checkpoints" and parents[1].name == "results":
        return RunDir(parents[2])
    return None
