"""`uv run apps/evaluate RUN_OR_CKPT [--data-dir D] [--output FILE.json] [key=value ...]`:
validation metrics of a trained run, printed as a table and written as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from post3r_train.atomic import atomic_write_text
from post3r_train.config import ConfigError, trainer_config

DESCRIPTIONS = {
    "ari": "FG-ARI per video, feature-decoder masks",
    "image_ari": "FG-ARI per frame, feature-decoder masks",
    "mbo": "mBO per video, feature-decoder masks",
    "image_mbo": "mBO per frame, feature-decoder masks",
    "pointmap_ari": "FG-ARI per video, pointmap-decoder masks",
    "pointmap_image_ari": "FG-ARI per frame, pointmap-decoder masks",
    "pointmap_mbo": "mBO per video, pointmap-decoder masks",
    "pointmap_image_mbo": "mBO per frame, pointmap-decoder masks",
    "object_point_error": "per-object 3D error / scene scale (matched slot, scale-aligned)",
    "point_error": "composite pointmap 3D error / scene scale (scale-aligned)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apps/evaluate",
        description="Validation metrics (FG-ARI, mBO, 3D errors) of a run or checkpoint.",
    )
    parser.add_argument("run", type=Path, metavar="RUN_OR_CKPT", help="run directory or .ckpt")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--data-dir", type=Path, help="dataset directory (default: the run's)")
    parser.add_argument("--config", help="config to use instead of the run's config.yaml")
    parser.add_argument("--output", type=Path, help="JSON file (default: next to the checkpoint)")
    parser.add_argument("--visualize", type=Path, help="also write visualisations to this folder")
    return parser


def format_table(metrics: dict[str, float]) -> str:
    """Metric, value and meaning, one row each (the `val/` prefix dropped)."""
    rows = [(name.removeprefix("val/"), value) for name, value in sorted(metrics.items())]
    width = max((len(name) for name, _ in rows), default=6)
    lines = [f"{'metric':<{width}}  {'value':>8}  meaning", "-" * (width + 40)]
    for name, value in rows:
        meaning = DESCRIPTIONS.get(name, "validation loss" if name.startswith("loss_") else "")
        lines.append(f"{name:<{width}}  {value:>8.4f}  {meaning}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    from post3r_train import engine
    from post3r_train.data import build_val_loader, prepare_data
    from post3r_train.runs import load_run, run_config_path
    from post3r_train.teacher_cache import check_run_cache

    try:
        cfg, model, checkpoint = load_run(
            args.run, config=args.config, overrides=args.overrides, data_dir=args.data_dir
        )
        root = prepare_data(cfg)
        config = args.config or str(run_config_path(args.run))
        check_run_cache(cfg, root, config, args.overrides)
        val_loader = build_val_loader(cfg, root)
        metrics = engine.evaluate_checkpoint(
            model, val_loader, trainer=trainer_config(cfg), visualize_dir=args.visualize
        )
    except (ConfigError, FileNotFoundError, ValueError, KeyError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{checkpoint} on {cfg.dataset.name} validation")
    print(format_table(metrics))
    output = args.output or checkpoint.with_name(f"eval-{checkpoint.stem}.json")
    report = {"checkpoint": str(checkpoint), "dataset": cfg.dataset.name, "metrics": metrics}
    atomic_write_text(Path(output), json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(f"written: {output}")
    return 0
