"""`uv run apps/evaluate RUN_OR_CKPT [--data-dir D] [--output FILE.json] [key=value ...]`:
validation metrics of a trained run (object discovery, and 3D against ground-truth geometry with
two baselines), printed as tables and written as JSON with the counts of what was evaluated."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

from post3r_train.atomic import atomic_write_text
from post3r_train.config import trainer_config
from post3r_train.console import CONSOLE_ERRORS, report_error
from post3r_train.metrics3d import is_count

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

# Rows of the 3D table: (metric name without prefix, label).
ROWS_3D = (
    ("obj3d_chamfer", "object Chamfer (lower is better)"),
    ("obj3d_accuracy", "object accuracy (lower is better)"),
    ("obj3d_completeness", "object completeness (lower is better)"),
    ("depth_abs_rel_scale", "depth Abs Rel, scale (lower is better)"),
    ("depth_delta125_scale", "depth δ<1.25, scale (higher is better)"),
    ("depth_abs_rel_scale_shift", "depth Abs Rel, scale&shift (lower)"),
    ("depth_delta125_scale_shift", "depth δ<1.25, scale&shift (higher)"),
    ("camera_ate", "camera ATE (lower is better)"),
    ("camera_rpe_trans", "camera RPE translation (lower)"),
    ("camera_rpe_rot", "camera RPE rotation, degrees (lower)"),
)
COLUMNS_3D = (("", "model"), ("baseline_composite_", "composite"), ("baseline_plane_", "plane"))
IS_3D = ("obj3d_", "depth_", "camera_")

PROTOCOL = {
    "obj3d": "each ground-truth object vs the points of the slot whose pixels (argmax of the "
    "pointmap-decoder masks) overlap it best over the video; one least-squares scale per video "
    "(composite vs truth, both in the first camera's frame); accuracy/completeness = mean "
    "nearest-neighbour distance pred->truth / truth->pred, Chamfer = their mean, divided by the "
    "video's mean true point norm; averaged over objects",
    "depth": "composite pointmap's camera-frame depth vs true depth (prediction resized "
    "bicubically); per video one robust L1 scale (scale) or L1 scale and shift (scale&shift) "
    "as TTT3R's eval/video_depth; averaged over valid pixels",
    "camera": "the poses the model used (teacher or ground truth) vs true poses: ATE = RMSE of "
    "camera centres after Umeyama Sim(3); RPE over consecutive frames (translation scaled by "
    "the alignment), RMSE of translation norm and rotation angle; averaged over videos",
    "baseline_composite": "every slot owns every pixel and predicts the model's composite "
    "pointmap (no object separation)",
    "baseline_plane": "the model's masks; every pixel of a video at one constant depth in its "
    "camera (the median of the model's composite depth there), placed by the same poses, "
    "scaled by the same alignments",
}


class NothingEvaluatedError(RuntimeError):
    """The validation set gave no sample to evaluate."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apps/evaluate",
        description="Validation metrics (FG-ARI, mBO; 3D against ground truth with two "
        "baselines) of a run or checkpoint. Never generates data: the shards must exist.",
    )
    parser.add_argument("run", type=Path, metavar="RUN_OR_CKPT", help="run directory or .ckpt")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--data-dir", type=Path, help="dataset directory (default: the run's)")
    parser.add_argument("--config", help="config to use instead of the run's config.yaml")
    parser.add_argument("--output", type=Path, help="JSON file (default: next to the checkpoint)")
    parser.add_argument("--visualize", type=Path, help="also write visualisations to this folder")
    return parser


def split_values(values: dict[str, float]) -> tuple[dict[str, float | None], dict[str, int]]:
    """(metrics with NaN as None, counts as ints) of the engine's `val/...` values."""
    metrics: dict[str, float | None] = {}
    counts: dict[str, int] = {}
    for name, value in values.items():
        short = name.removeprefix("val/")
        if is_count(short) or short == "data_skipped":
            counts[short] = int(value)
        else:
            metrics[name] = None if not math.isfinite(value) else value
    return metrics, counts


def unavailable_reason(name: str, counts: dict[str, int]) -> str:
    """Why metric `name` has no value (it counted nothing)."""
    short = name.removeprefix("val/")
    if short.startswith("baseline_plane_") and counts.get("obj3d_num_videos", 0) > 0:
        return "the shards have no camera intrinsics, which the constant-depth plane needs"
    core = short.removeprefix("baseline_composite_").removeprefix("baseline_plane_")
    if core.startswith("camera_") and counts.get("camera_num_skipped", 0) > 0:
        return (
            "every video's camera metrics were undefined (fewer than 2 frames or a static camera)"
        )
    if core.startswith(IS_3D):
        return (
            "no evaluated video had ground-truth geometry (pointmap, depth, camera_to_world and "
            "segmentations: synthetic shards) and a pointmap decoder"
        )
    if "ari" in core or "mbo" in core:
        return (
            "no sample had a ground-truth foreground object (or the shards have no segmentations)"
        )
    return "nothing was counted"


def build_report(
    values: dict[str, float], *, checkpoint: Path, dataset: str, data_dir: Path
) -> dict:
    """The JSON report: metrics (null where nothing was counted, with the reason), counts and
    the 3D protocol. Raises NothingEvaluatedError when no sample was evaluated."""
    metrics, counts = split_values(values)
    if counts.get("num_samples", 0) == 0:
        raise NothingEvaluatedError(
            f"nothing was evaluated: the validation shards in {data_dir} gave no video "
            f"({counts.get('data_skipped', 0)} corrupt samples skipped); check them with "
            f"`uv run apps/bench-data --data-dir {data_dir}` or remake them"
        )
    unavailable = {
        name: unavailable_reason(name, counts) for name, v in metrics.items() if v is None
    }
    report = {
        "checkpoint": str(checkpoint),
        "dataset": dataset,
        "data_dir": str(data_dir),
        "counts": counts,
        "metrics": metrics,
        "unavailable": unavailable,
    }
    if any(short.removeprefix("val/").startswith(IS_3D) for short in metrics):
        report["protocol_3d"] = PROTOCOL
    return report


def _cell(value: float | None) -> str:
    return f"{value:>10.4f}" if value is not None else f"{'-':>10}"


def format_table(metrics: dict[str, float | None]) -> str:
    """Object-discovery metrics and losses: metric, value and meaning, one row each (3D metrics
    and baselines are in `format_3d_table`)."""
    rows = [
        (name.removeprefix("val/"), value)
        for name, value in sorted(metrics.items())
        if not name.removeprefix("val/").startswith((*IS_3D, "baseline_"))
    ]
    width = max((len(name) for name, _ in rows), default=6)
    lines = [f"{'metric':<{width}}  {'value':>10}  meaning", "-" * (width + 42)]
    for name, value in rows:
        meaning = DESCRIPTIONS.get(name, "validation loss" if name.startswith("loss_") else "")
        lines.append(f"{name:<{width}}  {_cell(value)}  {meaning}")
    return "\n".join(lines)


def format_3d_table(metrics: dict[str, float | None], counts: dict[str, int]) -> str:
    """The model next to the two baselines, one row per 3D metric present ('-': not measured)."""
    width = max(len(label) for _, label in ROWS_3D)
    header = f"{'3D, same videos':<{width}}" + "".join(f"{c:>12}" for _, c in COLUMNS_3D)
    lines = [header, "-" * len(header)]
    for name, label in ROWS_3D:
        cells = [metrics.get(f"val/{prefix}{name}") for prefix, _ in COLUMNS_3D]
        if all(f"val/{prefix}{name}" not in metrics for prefix, _ in COLUMNS_3D):
            continue
        lines.append(f"{label:<{width}}" + "".join(f"  {_cell(c)}" for c in cells))
    lines.append(
        f"objects scored: {counts.get('obj3d_num_objects', 0)} in "
        f"{counts.get('obj3d_num_videos', 0)} videos; depth videos: "
        f"{counts.get('depth_num_videos_scale', 0)}; camera videos: "
        f"{counts.get('camera_num_videos', 0)} (skipped {counts.get('camera_num_skipped', 0)})"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    from post3r_train import engine
    from post3r_train.data import build_val_loader, existing_validation_data
    from post3r_train.runs import load_run, run_config_path
    from post3r_train.teacher_cache import check_run_cache

    try:
        # --visualize asks for the visuals even of a run trained with model.visualize=false.
        overrides = [*args.overrides, *(["model.visualize=true"] if args.visualize else [])]
        cfg, model, checkpoint = load_run(
            args.run, config=args.config, overrides=overrides, data_dir=args.data_dir
        )
        root = existing_validation_data(cfg)  # never generates: a typo is an error
        config = args.config or str(run_config_path(args.run))
        check_run_cache(cfg, root, config, args.overrides)
        values = engine.evaluate_checkpoint(
            model,
            build_val_loader(cfg, root),
            trainer=trainer_config(cfg),
            visualize_dir=args.visualize,
        )
        report = build_report(
            values, checkpoint=checkpoint, dataset=cfg.dataset.name, data_dir=root
        )
    except CONSOLE_ERRORS as error:
        return report_error(error)
    metrics, counts = report["metrics"], report["counts"]
    print(f"{checkpoint} on {cfg.dataset.name} validation ({root})")
    print(
        f"evaluated {counts['num_samples']} videos; {counts.get('data_skipped', 0)} corrupt "
        "samples skipped"
    )
    print(format_table(metrics))
    if "protocol_3d" in report:
        print()
        print(format_3d_table(metrics, counts))
    output = args.output or checkpoint.with_name(f"eval-{checkpoint.stem}.json")
    text = json.dumps(report, indent=2, sort_keys=True, allow_nan=False)
    try:
        atomic_write_text(Path(output), text + "\n")
    except OSError as error:  # a read-only or full disk: the table above is still on screen
        return report_error(error)
    print(f"written: {output}")
    return 0
