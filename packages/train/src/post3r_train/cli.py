"""`uv run apps/train [CONFIG] [--data-dir D] [--log-dir L] [--continue RUN_OR_CKPT] [--dry] [-v]
[--wandb] [key=value ...]`: train POST3R.

Without arguments it trains the embedded synthetic default on the CPU: the dataset is generated
once into ./data/, then the run goes to ./outputs/<experiment>/<timestamp>/.
`trainer.devices=N` (N > 1) starts N local processes through PyTorch's elastic launcher; under
torchrun or SLURM each process runs this same entry point.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, OmegaConf

from post3r_train.config import ConfigError, load_config, optim_config, resolved, trainer_config
from post3r_train.console import CONSOLE_ERRORS, report_error
from post3r_train.runs import run_config_path

if TYPE_CHECKING:  # the engine (torch.distributed) is imported when a run starts
    from post3r_train.engine import FitResult, TrainModule

log = logging.getLogger("post3r_train")

DEFAULT_LOG_DIR = Path("outputs")
INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl+C
HEADLINE = ("ari", "mbo", "image_ari", "image_mbo", "pointmap_ari", "pointmap_mbo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apps/train",
        description="Train POST3R. Without arguments: the embedded synthetic default (CPU is fine)",
        epilog="Overrides use the config's dotted keys, e.g. model.num_slots=7 "
        "dataset.batch_size=4 trainer.max_steps=1000 trainer.devices=4.",
    )
    parser.add_argument(
        "items",
        nargs="*",
        metavar="[CONFIG] [key=value ...]",
        help="a config (path, or name in configs/: default, smoke, ytvis2021, post3r_reference), "
        "then overrides",
    )
    parser.add_argument("--data-dir", type=Path, help="dataset directory (sets dataset.root)")
    parser.add_argument("--log-dir", type=Path, default=None, help="default: ./outputs")
    parser.add_argument(
        "--continue",
        dest="resume",
        type=Path,
        metavar="RUN_OR_CKPT",
        help="resume a run directory (its last checkpoint) or a checkpoint file",
    )
    parser.add_argument(
        "-n",
        "--dry",
        action="store_true",
        help="build everything, run one batch forward and backward, save nothing",
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("--wandb", action="store_true", help="also log to Weights & Biases")
    parser.add_argument("--wandb-project", default="post3r")
    parser.add_argument("--wandb-entity", default=None)
    parser.add_argument("--no-tensorboard", action="store_true")
    return parser


def split_items(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """The optional CONFIG (first item without '=') and the key=value overrides."""
    items = list(items)
    config = items.pop(0) if items and "=" not in items[0] else None
    stray = [item for item in items if "=" not in item]
    if stray:
        raise ConfigError(
            f"expected key=value overrides after the config, got {stray} "
            "(only one config may be given, as the first argument)"
        )
    return config, items


def load_run_config(args: argparse.Namespace) -> DictConfig:
    """The config file (or, on --continue without one, the run's own config.yaml), overrides,
    and --data-dir."""
    config, overrides = split_items(args.items)
    if config is None and args.resume is not None:
        saved = run_config_path(args.resume)
        config = str(saved) if saved is not None else None
    if args.data_dir is not None:
        overrides = [*overrides, f"dataset.root={args.data_dir}"]
    from post3r_train.data import adopt_recorded_dataset

    # A synthetic dataset given by --data-dir (e.g. apps/synth's output) is used as it is.
    return adopt_recorded_dataset(load_config(config, overrides), explicit=overrides)


def configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:
        import warnings

        warnings.filterwarnings("ignore", category=UserWarning, module="torch.*")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # options may come between the overrides
    configure_logging(args.verbose, args.quiet)
    try:
        cfg = load_run_config(args)
    except ConfigError as error:
        parser.error(str(error))
    from post3r_train import engine

    try:
        if args.resume is not None:  # before any data is generated or workers start
            _check_resumable(args.resume)
        if engine.needs_launch(cfg.trainer.devices) and not args.dry:
            from post3r_train.data import prepare_data

            prepare_data(cfg)  # once, before the workers start
            return engine.launch_local(cfg.trainer.devices, argv)
        return train(cfg, args)
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl+C): stopped without a new checkpoint", file=sys.stderr)
        return INTERRUPTED
    except CONSOLE_ERRORS as error:
        if args.verbose:
            raise
        return report_error(error)


def _check_resumable(resume: Path) -> None:
    """--continue names a checkpoint and its run is not held by another job."""
    from post3r_train import engine
    from post3r_train.engine.rundir import run_dir_of_checkpoint
    from post3r_train.engine.runlock import check_unlocked

    run = run_dir_of_checkpoint(engine.find_checkpoint(resume))
    if run is not None:
        check_unlocked(run.root)


def train(cfg: DictConfig, args: argparse.Namespace) -> int:
    from post3r_train import engine
    from post3r_train.data import build_loaders, checkpoint_aligned_epoch, prepare_data
    from post3r_train.model import POST3RModel
    from post3r_train.teacher_cache import check_run_cache

    started = time.monotonic()
    torch.manual_seed(cfg.seed)
    root = prepare_data(cfg)
    config, overrides = split_items(args.items)
    if config is None and args.resume is not None:  # the run's own config.yaml
        config = str(run_config_path(args.resume) or "") or None
    check_run_cache(cfg, root, config, overrides)  # before anything is built or trained
    model = POST3RModel.from_config(cfg)
    loaders = build_loaders(cfg, root, batches_per_epoch=checkpoint_aligned_epoch(cfg))
    if args.dry:
        return dry_run(model, loaders.train(0), cfg)
    wandb = None
    if args.wandb:
        wandb = engine.WandbSettings(project=args.wandb_project, entity=args.wandb_entity)
    result = engine.fit(
        model,
        loaders.train,
        loaders.val,
        trainer=trainer_config(cfg),
        optim=optim_config(cfg),
        seed=cfg.seed,
        log_dir=args.log_dir or DEFAULT_LOG_DIR,
        experiment=cfg.experiment,
        config=resolved(cfg),
        resume=args.resume,
        wandb=wandb,
        tensorboard=not args.no_tensorboard,
    )
    if result.rank == 0:  # the process group is already shut down here: ask the result
        print(summary(result, time.monotonic() - started))
    if result.stop_reason == "signal SIGINT":
        if result.rank == 0:
            print(f"interrupted (Ctrl+C): --continue {result.run_dir} resumes", file=sys.stderr)
        return INTERRUPTED
    return 0


def dry_run(model: TrainModule, batches: Iterable[dict], cfg: DictConfig) -> int:
    """One batch forward and backward; checks that every trainable parameter got a gradient."""
    batch = next(iter(batches))
    model.train()
    loss, parts = model.training_step(batch)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    print(OmegaConf.to_yaml(resolved(cfg)) if logging.getLogger().level <= logging.DEBUG else "")
    terms = ", ".join(f"{name} {value.item():.4f}" for name, value in parts.items())
    print(f"dry run: loss {loss.item():.5f} ({terms})")
    print(f"parameters: {trainable:,} trainable, {frozen:,} frozen")
    if missing:
        print(f"error: no gradient for {missing}", file=sys.stderr)
        return 1
    if not torch.isfinite(loss):
        print("error: the loss is not finite", file=sys.stderr)
        return 1
    return 0


def summary(result: FitResult, seconds: float) -> str:
    """The final report: headline validation metrics, time and the run directory."""
    lines = [f"finished at step {result.step} ({result.stop_reason}) in {seconds / 60:.1f} min"]
    metrics = result.val_metrics
    shown = [
        f"{name} {metrics[f'val/{name}']:.3f}" for name in HEADLINE if f"val/{name}" in metrics
    ]
    if shown:
        lines.append("validation: " + ", ".join(shown))
    if result.run_dir is not None:
        lines.append(f"run directory: {result.run_dir}")
    return "\n".join(lines)
