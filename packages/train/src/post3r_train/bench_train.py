"""`uv run apps/bench-train`: training steps per second and peak memory.

Cases: the default config on the CPU, and (when a GPU is present) the `ytvis2021.yaml` shapes
on the GPU: 518 px frames, DINOv2 ViT-B/14, the full-size TTT3R teacher. Frozen weights are
random (no checkpoints needed: speed does not depend on their values). Batches are synthetic
tensors of the config's shapes, so the figures measure the model step (forward, backward, AdamW)
without data loading. Each case also times the frozen part (teacher + frozen encoder forward)
alone, in the same run, and reports its share of the step.

`--seeds 0-4` trains the embedded default (or `--config`) once per seed, each in a fresh
process as a user would, and prints the table of final validation metrics and wall times
(`post3r_train.seed_table`).

`--compare-teachers` compares the online TTT3R teacher (`model.teacher.name=ttt3r`) with the
cached one (`cached`, whose targets arrive with the batch) in one run: steps/s, samples/s and
peak memory of both on the device (on a CPU the `tiny` TTT3R preset and a small DINOv2 at small
sizes, `CPU_TINY`; on a GPU the config's real sizes), FLOPs per training step of both at the
config's real sizes (counted by `torch.utils.flop_counter` on the meta device: no weights and no
arithmetic needed), and the online teacher's bf16-vs-fp32 target difference and the cache's
float16-storage difference (CPU, `tiny` preset, random weights).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from omegaconf import DictConfig

from post3r_backbone.allocator import keep_freed_memory_for
from post3r_kernels.timing import synchronize
from post3r_train.batch import Batch
from post3r_train.config import frame_size, load_config, trainer_config
from post3r_train.engine.trainer import autocast
from post3r_train.errors import ConfigError
from post3r_train.model import POST3RModel

RANDOM_FROZEN = [
    "model.encoder.pretrained=false",
    "model.teacher.random_weights=true",
    "model.teacher.checkpoint=null",
]


@dataclass
class Case:
    name: str
    config: str
    device: str
    overrides: tuple[str, ...] = ()


@dataclass
class Result:
    case: Case
    batch: str
    steps_per_s: float
    frozen_share: float
    peak_memory_gb: float
    trainable_m: float


def synthetic_batch(cfg: DictConfig, device: torch.device) -> Batch:
    """A training batch of the config's shapes: frames, ids, pointmaps 5 units in front of an
    identity camera (and, for `model.teacher.name=cached`, the cached teacher's maps at the
    decoder's resolution, as the loader delivers them)."""
    b, t = cfg.dataset.batch_size, cfg.dataset.chunk_size
    h = w = frame_size(cfg)
    if device.type == "meta":
        return cast(Batch, _meta_batch(cfg, device))
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(b, t, h, w, 3, generator=generator) + torch.tensor([0.0, 0.0, 5.0])
    batch = {
        "frames": torch.rand(b, t, 3, h, w, generator=generator),
        "segmentations": torch.randint(0, 5, (b, t, h, w), generator=generator),
        "pointmap": points,
        "camera_to_world": torch.eye(4).expand(b, t, 4, 4).clone(),
    }
    if cfg.model.teacher.name == "cached":
        dh, dw = cfg.model.decoder_resolution
        cached = torch.randn(b, t, dh, dw, 3, generator=generator) + torch.tensor([0.0, 0.0, 5.0])
        batch["teacher_pointmap"] = cached
        batch["teacher_confidence"] = 1 + torch.rand(b, t, dh, dw, generator=generator)
        batch["teacher_camera_to_world"] = torch.eye(4).expand(b, t, 4, 4).clone()
    return cast(Batch, {key: value.to(device) for key, value in batch.items()})


def _meta_batch(cfg: DictConfig, device: torch.device) -> dict[str, torch.Tensor]:
    """The same shapes on the meta device (no values): for counting FLOPs."""
    b, t = cfg.dataset.batch_size, cfg.dataset.chunk_size
    h = w = frame_size(cfg)
    dh, dw = cfg.model.decoder_resolution
    shapes = {
        "frames": (b, t, 3, h, w),
        "pointmap": (b, t, h, w, 3),
        "camera_to_world": (b, t, 4, 4),
    }
    if cfg.model.teacher.name == "cached":
        shapes["teacher_pointmap"] = (b, t, dh, dw, 3)
        shapes["teacher_confidence"] = (b, t, dh, dw)
        shapes["teacher_camera_to_world"] = (b, t, 4, 4)
    batch = {key: torch.empty(shape, device=device) for key, shape in shapes.items()}
    batch["segmentations"] = torch.empty((b, t, h, w), dtype=torch.long, device=device)
    return batch


def _timed(fn, steps: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def make_train_step(
    cfg: DictConfig, device: torch.device
) -> tuple[POST3RModel, Batch, Callable[[], None]]:
    """The model, a synthetic batch, and one training step on it (forward under the config's
    precision, backward, AdamW) as a call: what the benchmarks time. On a CPU the process keeps
    freed memory for reuse when the config's trainer does (`trainer.cpu_keep_freed_memory`),
    so that the step runs as in training."""
    trainer = trainer_config(cfg)
    if trainer.cpu_keep_freed_memory:
        keep_freed_memory_for(device)
    precision = trainer.precision_mode
    torch.manual_seed(0)
    model = POST3RModel.from_config(cfg).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = synthetic_batch(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16")

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss, _ = model.training_step(batch.copy())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return model, batch, train_step


def run_case(case: Case, steps: int, warmup: int, overrides: Sequence[str]) -> Result:
    device = torch.device(case.device)
    cfg = load_config(case.config, [*RANDOM_FROZEN, *case.overrides, *overrides])
    precision = trainer_config(cfg).precision_mode
    model, batch, train_step = make_train_step(cfg, device)

    @torch.no_grad()
    def frozen_forward() -> None:
        with autocast(device, precision):
            teacher = model._teacher(batch.copy(), None, True)
            if model.encoder is not None and not any(
                p.requires_grad for p in model.encoder.parameters()
            ):
                model.encoder(batch["frames"])
            del teacher

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        train_step()
    step_s = _timed(train_step, steps, device)
    frozen_s = _timed(frozen_forward, max(1, steps // 2), device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    b, t = cfg.dataset.batch_size, cfg.dataset.chunk_size
    h = w = frame_size(cfg)
    return Result(
        case=case,
        batch=f"{b}x{t}x{h}x{w}",
        steps_per_s=1.0 / step_s,
        frozen_share=frozen_s / step_s,
        peak_memory_gb=peak,
        trainable_m=sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
    )


def format_table(results: list[Result]) -> str:
    header = (
        f"{'case':<22} {'device':<7} {'batch BxTxHxW':<16} {'steps/s':>8} {'ms/step':>8} "
        f"{'frozen %':>8} {'peak GiB':>9} {'train M':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.case.name:<22} {r.case.device:<7} {r.batch:<16} {r.steps_per_s:>8.2f} "
            f"{1000 / r.steps_per_s:>8.1f} {100 * r.frozen_share:>8.1f} "
            f"{r.peak_memory_gb:>9.2f} {r.trainable_m:>8.2f}"
        )
    return "\n".join(lines)


def default_cases(device: str) -> list[Case]:
    cases = []
    if device in ("auto", "cpu"):
        cases.append(Case("default (synthetic)", "default", "cpu"))
    if device in ("auto", "cuda") and torch.cuda.is_available():
        cases.append(Case("ytvis2021 shapes", "ytvis2021", "cuda", ("model.teacher.name=ttt3r",)))
    elif device == "cuda":
        raise SystemExit("error: --device cuda but no CUDA/ROCm device is visible")
    return cases


def _print_machine() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads", end="")
    if torch.cuda.is_available():
        print(f", {torch.cuda.get_device_name()}", end="")
    print()


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {low}, got {value}")
        return value

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="apps/bench-train",
        description="Training steps/s and peak memory: the default config on CPU, the "
        "ytvis2021 shapes on a GPU when one is present.",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every case")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--config", help="benchmark this config instead (on --device)")
    parser.add_argument("--steps", type=_at_least(1), default=10, help="timed steps per case")
    parser.add_argument("--warmup", type=_at_least(0), default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch)")
    parser.add_argument(
        "--compare-teachers",
        action="store_true",
        help="online vs cached 3D teacher of --config (default ytvis2021): steps/s, samples/s, "
        "peak memory, FLOPs per step at the config's real sizes",
    )
    parser.add_argument(
        "--seeds",
        help="train --config (default: the embedded default) once per seed (e.g. 0-4), each a "
        "fresh apps/train process with fresh data, and print a table of the final validation "
        "metrics and wall times (see post3r_train.seed_table)",
    )
    parser.add_argument(
        "--keep", type=Path, help="with --seeds: keep each seed's data and run under KEEP/seed-N"
    )
    args = parser.parse_args(argv)
    if args.seeds is not None:
        return _seeds(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare_teachers:
        from post3r_train.benchmark_teachers import compare_teachers

        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but no CUDA/ROCm device is visible")
        cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        device = torch.device("cuda" if cuda else "cpu")
        _print_machine()
        return compare_teachers(
            args.config or "ytvis2021", args.overrides, device, args.steps, args.warmup
        )
    if args.config:
        device_name = (
            "cuda"
            if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
            else "cpu"
        )
        cases = [Case(args.config, args.config, device_name)]
    else:
        cases = default_cases(args.device)
    _print_machine()
    results = []
    for case in cases:
        print(f"running {case.name} on {case.device} ...", file=sys.stderr, flush=True)
        try:
            results.append(run_case(case, args.steps, args.warmup, args.overrides))
        except (ValueError, FileNotFoundError) as error:  # config, overrides, data: usage
            parser.error(str(error))
    print(format_table(results))
    print("frozen % = teacher + frozen encoder forward time / whole training step (same run)")
    return 0


def _seeds(args: argparse.Namespace) -> int:
    """`--seeds`: validated up front, so a typo fails before the first run, not in each."""
    from post3r_train.seed_table import parse_seeds, seeds_table

    try:
        seeds = parse_seeds(args.seeds)
        if any(item.partition("=")[0].strip() == "seed" for item in args.overrides):
            raise ConfigError("--seeds sets seed=N itself: drop the seed=... override")
        load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return seeds_table(seeds, args.overrides, args.config, args.keep)
