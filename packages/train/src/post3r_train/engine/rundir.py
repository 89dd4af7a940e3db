"""The run directory and what is logged into it.

```
<log-dir>/<experiment>/<YYYYmmdd_HHMMSS>/
  config.yaml                 resolved config (rewritten on --continue)
  logs/metrics/metrics.csv    one row per log event: step, then one column per metric
  logs/tensorboard/           scalars and the validation images
  logs/wandb/                 only with --wandb
  logs/failure-rank<N>.txt    the traceback of each failure of rank N (only if one failed)
  results/checkpoints/        last.ckpt, step=NNNNNN.ckpt
  visualizations/step=NNNNNN/ what the module's `visualize` wrote at each validation
```
Only rank 0 writes here, except for the failure logs. On resume, log rows after the checkpoint's
step are dropped, so a resumed run's logs read as if it had never stopped.
"""

from __future__ import annotations

import csv
import datetime
import io
import logging
import math
import netrc
import os
import traceback
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from post3r_train.engine.checkpoint import atomic_write, atomic_write_text

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


def config_dict(config: Any) -> dict[str, Any]:
    """A config as a plain dict (for W&B); {} for none or YAML text."""
    if config is None or isinstance(config, str):
        return {}
    from omegaconf import OmegaConf

    if OmegaConf.is_config(config):
        return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
    return dict(config)


def run_dir_of_checkpoint(checkpoint: Path) -> RunDir | None:
    """The run directory holding `checkpoint` (…/results/checkpoints/x.ckpt), if it is in one."""
    parents = Path(checkpoint).resolve().parents
    if len(parents) >= 3 and parents[0].name == "checkpoints" and parents[1].name == "results":
        return RunDir(parents[2])
    return None


class MetricsCSV:
    """`metrics.csv`: a `step` column, then one column per metric name seen so far.

    Rows are appended; a new metric name rewrites the file (atomically) with a wider header.
    """

    def __init__(self, path: Path, keep_until_step: int | None = None) -> None:
        self.path = Path(path)
        self.columns: list[str] = ["step"]
        rows = []
        if self.path.is_file():
            self.columns, rows = self._read()
        self._rewrite([row for row in rows if _keep(row, keep_until_step)])

    def write(self, step: int, values: dict[str, float]) -> None:
        row = {"step": str(step), **{key: _format(value) for key, value in values.items()}}
        new = sorted(key for key in row if key not in self.columns)
        if new:
            rows = self._read()[1]
            self.columns += new
            self._rewrite([*rows, row])
            return
        with open(self.path, "a", newline="") as file:
            csv.DictWriter(file, self.columns).writerow(row)

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        with open(self.path, newline="") as file:
            reader = csv.DictReader(file)
            return list(reader.fieldnames or ["step"]), list(reader)

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, self.columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.path, lambda file: file.write(buffer.getvalue().encode()))


def _keep(row: dict[str, str], keep_until_step: int | None) -> bool:
    try:
        return keep_until_step is None or int(row["step"]) <= keep_until_step
    except (KeyError, TypeError, ValueError):
        return False


def _format(value: float) -> str:
    return repr(float(value)) if math.isfinite(float(value)) else str(float(value))


@dataclass
class WandbSettings:
    """`--wandb`: log to Weights & Biases as well (offline with WANDB_MODE=offline)."""

    project: str = "post3r"
    entity: str | None = None


class RunLogger:
    """Scalars to metrics.csv, TensorBoard and optionally W&B; images to TensorBoard/W&B."""

    def __init__(
        self,
        run: RunDir,
        resume_step: int | None = None,
        *,
        tensorboard: bool = True,
        wandb: WandbSettings | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.run = run
        self.csv = MetricsCSV(run.metrics_csv, keep_until_step=resume_step)
        self.tensorboard = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self.tensorboard = SummaryWriter(str(run.tensorboard_dir), purge_step=purge)
        self.wandb = start_wandb(run, wandb, config or {}) if wandb is not None else None

    @classmethod
    def start(
        cls,
        run: RunDir,
        config: Any = None,
        resume_step: int | None = None,
        *,
        tensorboard: bool = True,
        wandb: WandbSettings | None = None,
    ) -> RunLogger:
        """Rank 0's start of a run: its folders, config.yaml (when given) and loggers, whose
        records after `resume_step` (a resumed run) are dropped."""
        run.make_folders()
        if config is not None:
            run.save_config(config)
        settings = config_dict(config)
        return cls(run, resume_step, tensorboard=tensorboard, wandb=wandb, config=settings)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.csv.write(step, values)
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def log_images(self, step: int, directory: Path) -> None:
        """Every PNG the module wrote into `directory`, tagged `val/<file name>`."""
        pngs = sorted(Path(directory).glob("**/*.png"))
        if not pngs:
            return
        from PIL import Image

        for png in pngs:
            tag = "val/" + png.relative_to(directory).with_suffix("").as_posix()
            image = np.asarray(Image.open(png).convert("RGB"))
            if self.tensorboard is not None:
                self.tensorboard.add_image(tag, image, step, dataformats="HWC")
            if self.wandb is not None:
                import wandb

                self.wandb.log({tag: wandb.Image(str(png))}, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(run: RunDir, settings: WandbSettings, config: dict[str, Any]) -> Any:
    """Start (or, on resume, continue) the W&B run of this run directory.

    Safe without a network or an account: with no API key (WANDB_API_KEY or `wandb login`) and
    no WANDB_MODE, W&B logs offline into the run directory (`wandb sync` uploads it later) instead
    of prompting for a login; if W&B cannot start at all, training goes on without it.
    """
    try:
        import wandb
    except ImportError as exc:
        raise RuntimeError(
            "--wandb needs the wandb package, which is an optional extra: run "
            "`uv sync --extra wandb` (or drop --wandb; metrics.csv and TensorBoard always work)"
        ) from exc
    id_file = run.logs / "wandb" / "run_id"
    id_file.parent.mkdir(parents=True, exist_ok=True)
    run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
    atomic_write_text(id_file, run_id)
    mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_api_key_known() else "offline")
    log.info("W&B run %s, %s (WANDB_MODE chooses online or offline)", run_id, mode)
    try:
        return wandb.init(
            project=settings.project,
            entity=settings.entity,
            name=f"{run.root.parent.name}_{run.root.name}",
            id=run_id,
            resume="allow",
            dir=str(run.logs),
            config=config,
            mode=mode,
        )
    except Exception as exc:  # W&B's errors have no common base class
        log.warning(
            "W&B could not start (%s: %s); training goes on, logging to metrics.csv and "
            "TensorBoard only (WANDB_MODE=offline logs to W&B without a network)",
            type(exc).__name__,
            exc,
        )
        return None


def _wandb_api_key_known() -> bool:
    """Whether W&B has an API key: WANDB_API_KEY, or `wandb login`'s entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False
