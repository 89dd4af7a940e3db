"""`uv run apps/eval-backbone --data-dir D [--checkpoint C | --preset P --random-weights]
[--frames N]`: the TTT3R backbone alone on every video of shards with ground-truth geometry,
streamed from each video's first frame, for both update rules: video depth, camera trajectory,
frames/s and peak memory, with the protocol printed next to the numbers."""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from post3r_train.atomic import atomic_write_text
from post3r_train.console import CONSOLE_ERRORS, report_error
from post3r_train.metrics3d import CameraTrajectory, VideoDepth, is_count

RULES = ("cut3r", "ttt3r")
PROTOCOL = (
    "Protocol (TTT3R's eval/video_depth and eval/relpose): each video streamed from its first "
    "frame with a fresh state, frames centre-cropped and resized to SIZE². Depth = z of the "
    "self-view pointmap; per video one alignment of all frames to the true depth, robust L1 "
    "scale (scale) or L1 scale and shift (scale&shift); Abs Rel = mean |d - d*| / d*, "
    "δ<1.25 = share of pixels with max(d/d*, d*/d) < 1.25, over all valid pixels of all videos. "
    "Camera: predicted camera-to-world centres aligned to the truth by Umeyama Sim(3); ATE = "
    "RMSE of centre errors; RPE = RMSE over consecutive frames of the relative pose's "
    "translation error (scaled by the alignment) and rotation error (degrees); averaged over "
    "videos. frames/s: backbone steps only (data loading excluded); peak memory: the GPU's "
    "peak allocation per rule, or on CPU the process's peak resident set size so far."
)


@dataclass(frozen=True)
class RuleResult:
    metrics: dict[str, float]
    frames: int
    seconds: float
    peak_memory_mib: float
    memory_kind: str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apps/eval-backbone",
        description="Video depth and camera metrics of the TTT3R backbone alone, both update "
        "rules, on shards with ground-truth geometry (synthetic).",
    )
    parser.add_argument("--data-dir", type=Path, required=True, help="folder of the shards")
    parser.add_argument("--dataset", default="synthetic", help="shard name prefix")
    parser.add_argument("--split", default="validation", choices=("validation", "train"))
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", type=Path, help="TTT3R .pth or converted .safetensors")
    weights.add_argument(
        "--random-weights", action="store_true", help="untrained --preset weights (tests only)"
    )
    parser.add_argument("--preset", default="ttt3r_512", help="architecture with --random-weights")
    parser.add_argument("--frames", type=int, help="at most this many frames per video")
    parser.add_argument("--videos", type=int, help="at most this many videos")
    parser.add_argument(
        "--image-size", type=int, default=512, help="square frame side fed to the backbone"
    )
    parser.add_argument("--rules", default=",".join(RULES), help="update rules, comma-separated")
    parser.add_argument("--max-depth", type=float, help="depth cap (TTT3R: 70 on Sintel/Bonn)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, help="also write the figures as JSON")
    return parser


def check_args(args: argparse.Namespace) -> list[str]:
    """Everything wrong with the arguments (before any work), each naming the fix."""
    problems = []
    if args.frames is not None and args.frames < 2:
        problems.append(
            f"--frames must be >= 2 (camera metrics need two frames), got {args.frames}"
        )
    if args.videos is not None and args.videos < 1:
        problems.append(f"--videos must be >= 1, got {args.videos}")
    if args.image_size < 16 or args.image_size % 16:
        problems.append(f"--image-size must be a positive multiple of 16, got {args.image_size}")
    unknown = [rule for rule in args.rules.split(",") if rule not in RULES]
    if unknown or not args.rules:
        problems.append(f"--rules takes a comma-separated subset of {','.join(RULES)}")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        problems.append(
            f"checkpoint {args.checkpoint} does not exist (cut3r_512_dpt_4_64.pth from the CUT3R "
            "release, or its converted .safetensors; see packages/backbone/README.md)"
        )
    if args.max_depth is not None and args.max_depth <= 0:
        problems.append(f"--max-depth must be > 0, got {args.max_depth}")
    return problems


def build_backbone(args: argparse.Namespace) -> torch.nn.Module:
    from post3r_backbone import TTT3R, TTT3RConfig, load_checkpoint

    if args.checkpoint is not None:
        model = load_checkpoint(args.checkpoint, device=args.device)
    else:
        model = TTT3R(TTT3RConfig.preset(args.preset)).to(args.device)
    return model.freeze()


def evaluate_rule(model, videos, args: argparse.Namespace, rule: str) -> RuleResult:
    """Stream every video through `model` with update rule `rule`; metrics and speed."""
    model.update_rule = rule
    device = torch.device(args.device)
    metrics = [
        VideoDepth("scale", max_depth=args.max_depth),
        VideoDepth("scale&shift", max_depth=args.max_depth),
        CameraTrajectory(),
    ]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    frames_done, seconds = 0, 0.0
    for batch in tqdm(videos(), desc=f"TTT3R {rule}", unit="video", leave=False):
        frames = batch["frames"][:, : args.frames]
        length = frames.shape[1]
        start = time.perf_counter()
        with torch.inference_mode():
            out, _ = model.forward_video(
                frames.to(device).float() / 255 if frames.dtype == torch.uint8 else frames,
                outputs=["pts3d_self", "camera_to_world"],
                output_device="cpu",
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
        frames_done += frames.shape[0] * length
        depth = out.pts3d_self[..., 2]
        for metric in metrics[:2]:
            metric.update(depth, batch["depth"][:, :length])
        metrics[2].update(out.camera_to_world.double(), batch["camera_to_world"][:, :length])
    values: dict[str, float] = {}
    for metric in metrics:
        values.update(metric.compute())
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "GPU peak allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"
    return RuleResult(values, frames_done, seconds, peak, kind)


def format_table(results: dict[str, RuleResult]) -> str:
    rows = (
        ("depth_abs_rel_scale", "depth Abs Rel, scale"),
        ("depth_delta125_scale", "depth δ<1.25, scale"),
        ("depth_abs_rel_scale_shift", "depth Abs Rel, scale&shift"),
        ("depth_delta125_scale_shift", "depth δ<1.25, scale&shift"),
        ("camera_ate", "camera ATE"),
        ("camera_rpe_trans", "camera RPE translation"),
        ("camera_rpe_rot", "camera RPE rotation (deg)"),
        ("depth_num_videos_scale", "videos (depth)"),
        ("camera_num_videos", "videos (camera)"),
    )
    header = f"{'':<28}" + "".join(f"{rule:>12}" for rule in results)
    lines = [header, "-" * len(header)]
    for key, label in rows:
        digits = 0 if is_count(key) else 4
        cells = "".join(f"{r.metrics[key]:>12.{digits}f}" for r in results.values())
        lines.append(f"{label:<28}{cells}")
    lines.append(
        f"{'frames/s':<28}" + "".join(f"{r.frames / r.seconds:>12.2f}" for r in results.values())
    )
    lines.append(
        f"{'peak memory (MiB)':<28}"
        + "".join(f"{r.peak_memory_mib:>12.0f}" for r in results.values())
    )
    return "\n".join(lines)


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problems = check_args(args)
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    from post3r_backbone.allocator import keep_freed_memory_for
    from post3r_data import find_shards, make_val_loader

    keep_freed_memory_for(args.device)  # each frame re-allocates the same large maps
    try:
        shards = find_shards(args.data_dir, args.dataset, args.split)
        model = build_backbone(args)
    except CONSOLE_ERRORS as error:
        return report_error(error)
    fields = ("depth", "camera_to_world")

    def videos():
        loader = make_val_loader(shards, resolution=args.image_size, fields=fields)
        for index, batch in enumerate(loader):
            if args.videos is not None and index >= args.videos:
                return
            yield batch

    try:
        results = {rule: evaluate_rule(model, videos, args, rule) for rule in args.rules.split(",")}
    except (KeyError, ValueError) as error:
        print(
            f"error: {error} (eval-backbone needs shards with depth and camera_to_world)",
            file=sys.stderr,
        )
        return 1
    if not any(r.frames for r in results.values()):
        print(
            f"error: nothing was evaluated: no readable video in {args.data_dir}", file=sys.stderr
        )
        return 1
    weights = args.checkpoint or f"{args.preset} with random weights"
    first = next(iter(results.values()))
    print(
        f"TTT3R ({weights}) on {first.metrics['depth_num_videos_scale']:.0f} videos of "
        f"{args.data_dir} ({args.split}), {args.image_size}² frames, on {args.device}"
    )
    print(format_table(results))
    print(f"peak memory: {first.memory_kind}")
    print(textwrap.fill(PROTOCOL.replace("SIZE", str(args.image_size)), width=100))
    if args.output is not None:
        report = {
            "weights": str(weights),
            "data_dir": str(args.data_dir),
            "split": args.split,
            "image_size": args.image_size,
            "device": args.device,
            "protocol": PROTOCOL.replace("SIZE", str(args.image_size)),
            "rules": {
                rule: {
                    "metrics": {k: _json_number(v) for k, v in r.metrics.items()},
                    "frames": r.frames,
                    "frames_per_second": r.frames / r.seconds,
                    "peak_memory_mib": r.peak_memory_mib,
                    "peak_memory_kind": r.memory_kind,
                }
                for rule, r in results.items()
            },
        }
        try:
            atomic_write_text(args.output, json.dumps(report, indent=2, allow_nan=False) + "\n")
        except OSError as error:  # a read-only or full disk: the table above is still on screen
            return report_error(error)
        print(f"written: {args.output}")
    return 0
