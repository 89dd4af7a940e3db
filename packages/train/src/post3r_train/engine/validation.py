"""Validation and evaluation: every rank evaluates its shard, metrics are combined once.

The batch loop has no collective, so ranks may hold different numbers of batches (uneven
WebDataset splits cannot hang); torchmetrics' `compute` (the one collective) then runs on every
rank and sums the metric states, so the figures equal a single-process evaluation.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from post3r_train.engine.batches import ValLoaderFactory, skipped_count
from post3r_train.engine.checkpoint import find_checkpoint, read_checkpoint
from post3r_train.engine.distributed import (
    DistEnv,
    all_reduce_sum,
    init_distributed,
    shutdown_distributed,
)
from post3r_train.engine.module import TrainModule, move_to_device
from post3r_train.engine.trainer_config import TrainerConfig

if TYPE_CHECKING:
    from torchmetrics import MetricCollection


def evaluate_checkpoint(
    module: TrainModule,
    val_loader: ValLoaderFactory,
    *,
    checkpoint: Path | str | None = None,
    trainer: TrainerConfig | None = None,
    visualize_dir: Path | None = None,
    env: DistEnv | None = None,
) -> dict[str, float]:
    """Validation metrics of `module` (with a checkpoint's trainable weights, if given).

    Under torchrun each rank evaluates its shard and the metrics are combined, so the figures
    equal a single-process evaluation of the same checkpoint.
    """
    trainer = trainer or TrainerConfig()
    own_env = env is None
    env = env or init_distributed(trainer.accelerator, trainer.dist_timeout_s)
    try:
        module.to(env.device)
        if checkpoint is not None:
            path = find_checkpoint(Path(checkpoint))
            module.load_trainable_state_dict(read_checkpoint(path)["model"], source=str(path))
        metrics = module.make_metrics().to(env.device)
        values, skipped = run_validation(
            module,
            metrics,
            val_loader,
            env,
            precision=trainer.precision_mode,
            limit=trainer.limit_val_batches,
            visualize_dir=visualize_dir if env.is_main else None,
            progress=trainer.progress_bar and env.is_main,
        )
        values["val/data_skipped"] = float(skipped)  # corrupt samples the loaders left out
        return values
    finally:
        if own_env:
            shutdown_distributed(env)


def run_validation(
    module: TrainModule,
    metrics: MetricCollection,
    val_loader: ValLoaderFactory,
    env: DistEnv,
    *,
    precision: str = "32",
    limit: int | None = None,
    visualize_dir: Path | None = None,
    step: int | None = None,
    progress: bool = False,
) -> tuple[dict[str, float], int]:
    """Metrics over every rank's validation shard, and the number of corrupt samples skipped.

    The batch loop has no collective, so ranks may hold different numbers of batches;
    `compute` (a collective) then runs once on every rank. `step`: the training step the
    visuals in `visualize_dir` belong to (None in an evaluation).
    """
    was_training = module.training
    module.eval()
    metrics.reset()
    batches = val_loader()
    bar = tqdm(batches, desc="validate", leave=False, disable=not progress, dynamic_ncols=True)
    with torch.no_grad(), autocast(env.device, precision):
        for index, batch in enumerate(bar):
            if limit is not None and index >= limit:
                break
            batch = move_to_device(batch, env.device)
            outputs = module.validation_step(batch, metrics)
            if index == 0 and visualize_dir is not None:
                module.visualize(batch, outputs, visualize_dir, step)
    bar.close()
    skipped = skipped_count(batches)
    values = compute_metrics(metrics)
    skipped = int(all_reduce_sum(torch.tensor([float(skipped)], device=env.device), env).item())
    module.train(was_training)
    return values, skipped


def compute_metrics(metrics: MetricCollection, prefix: str = "val/") -> dict[str, float]:
    """`metrics.compute()` (synchronised over ranks) as plain floats; vectors get `_i` suffixes."""
    with warnings.catch_warnings():
        # A rank whose shard was empty still joins the sync; its own states are the defaults.
        warnings.filterwarnings("ignore", message=".*before the ``update`` method.*")
        raw = metrics.compute()
    values = {}
    for name, value in raw.items():
        flat = torch.as_tensor(value).detach().float().flatten().cpu()
        if flat.numel() == 1:
            values[prefix + name] = float(flat[0])
        else:
            values.update({f"{prefix}{name}_{i}": float(x) for i, x in enumerate(flat)})
    return values


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context for `trainer.precision` ('32' disables it)."""
    if precision == "32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
