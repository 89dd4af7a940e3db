"""Where a run's scalars and images go: metrics.csv, TensorBoard and (optionally) W&B.

On resume, records after the checkpoint's step are dropped, so a resumed run's logs read as if
it had never stopped.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import netrc
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from post3r_train.atomic import atomic_write, atomic_write_text
from post3r_train.engine.rundir import RunDir

log = logging.getLogger("post3r_train.engine")


class MetricsCSV:
    """`metrics.csv`: a `step` column, then one column per metric name seen so far.

    Rows are appended; a new metric name rewrites the file (atomically) with a wider header.
    """

    def __init__(self, path: Path, keep_until_step: int | None = None) -> None:
        self.path = Path(path)
        self.columns: list[str] = ["step"]
        rows: list[dict[str, str]] = []
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


def config_dict(config: Any) -> dict[str, Any]:
    """A config as a plain dict (for W&B); {} for none or YAML text."""
    if config is None or isinstance(config, str):
        return {}
    from omegaconf import OmegaConf

    if OmegaConf.is_config(config):
        return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
    return dict(config)
