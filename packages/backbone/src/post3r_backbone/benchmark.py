"""Frames per second and peak memory of streaming inference against sequence length.

    uv run apps/bench-backbone  # tiny on CPU, plus ttt3r_512 in bf16 on a GPU if there is one
    python -m post3r_backbone.benchmark --device cuda --preset ttt3r_512 --lengths 16 64 256

Weights are random (speed does not depend on them). Each run streams T frames through
`model.step` from a fresh state, dropping the outputs as a consumer would, after a few warm-up
frames. Peak memory is the CUDA allocator's peak (weights included) or, on CPU, the peak resident
set size. Ratios in the same run: memory against the shortest sequence (flat = 1.00) and the
TTT3R rule's speed against the CUT3R rule's (the cost of the gate).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from post3r_backbone.config import TTT3RConfig
from post3r_backbone.model import TTT3R
from post3r_kernels.timing import synchronize

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Result:
    rule: str
    length: int
    fps: float
    peak_bytes: int | None


def random_model(config: TTT3RConfig, device: torch.device) -> TTT3R:
    """A frozen model with PyTorch's default random initialisation, created on `device`."""
    torch.manual_seed(0)
    with torch.device(device):
        return TTT3R(config).freeze()


def _resident_bytes() -> int | None:
    statm = Path("/proc/self/statm")
    if not statm.exists():
        return None
    return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def stream(
    model: TTT3R,
    pool: torch.Tensor,
    length: int,
    dtype: torch.dtype,
    warmup: int,
    outputs: tuple[str, ...] | None,
) -> tuple[float, int | None]:
    """Seconds per frame and peak memory while streaming `length` frames from a fresh state."""
    device = pool.device
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with torch.inference_mode(), autocast:
        state = model.init_state(pool.shape[1])
        for t in range(warmup):
            _, state = model.step(pool[t % len(pool)], state, outputs=outputs)
        state = model.init_state(pool.shape[1])
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        peak = _resident_bytes() or 0
        start = time.perf_counter()
        for t in range(length):
            _, state = model.step(pool[t % len(pool)], state, outputs=outputs)
            if device.type == "cpu":
                peak = max(peak, _resident_bytes() or 0)
        synchronize(device)
        seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    return seconds / length, peak or None


def run_configuration(
    args: argparse.Namespace, device: torch.device, preset: str, size: tuple[int, int]
) -> None:
    config = TTT3RConfig.preset(preset)
    model = random_model(config, device)
    dtype = DTYPES[args.dtype if device.type == "cuda" else "fp32"]
    pool = torch.rand(4, args.batch, 3, *size, generator=torch.Generator().manual_seed(0)).to(
        device
    )
    outputs = tuple(args.outputs) if args.outputs else None
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"\n{preset} on {name}: {size[0]}x{size[1]} (HxW), batch {args.batch}, "
        f"{'autocast ' + args.dtype if dtype != torch.float32 else 'fp32'}, "
        f"{millions:.1f} M parameters ({weights / 2**20:.0f} MiB), "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )
    results = []
    for length in args.lengths:  # rules alternate, so their ratio sees the same machine load
        for rule in args.rules:
            model.update_rule = rule
            seconds, peak = stream(model, pool, length, dtype, args.warmup, outputs)
            results.append(Result(rule, length, args.batch / seconds, peak))
    _print_table(sorted(results, key=lambda r: args.rules.index(r.rule)))
    if args.profile:
        _profile(model, pool, dtype, args.profile, outputs)


def _profile(model: TTT3R, pool: torch.Tensor, dtype: torch.dtype, frames: int, outputs) -> None:
    """Where the time goes: the busiest operators over a few frames (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    device = pool.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with torch.inference_mode(), autocast:
        state = model.init_state(pool.shape[1])
        _, state = model.step(pool[0], state, outputs=outputs)
        synchronize(device)
        with profile(activities=activities) as profiler:
            for t in range(frames):
                _, state = model.step(pool[t % len(pool)], state, outputs=outputs)
            synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile of {frames} frames, by {sort}:")
    print(profiler.key_averages().table(sort_by=sort, row_limit=20, max_name_column_width=60))


def _print_table(results: list[Result]) -> None:
    shortest = {r.rule: r for r in results if r.length == min(x.length for x in results)}
    cut3r = {r.length: r for r in results if r.rule == "cut3r"}
    columns = ("frames/s", "ms/frame", "peak MiB", "mem/first", "fps/cut3r")
    header = f"{'rule':<6} {'frames':>6} " + " ".join(f"{c:>9}" for c in columns)
    print(header)
    print("-" * len(header))
    for r in results:
        peak = f"{r.peak_bytes / 2**20:9.0f}" if r.peak_bytes else f"{'n/a':>9}"
        base = shortest[r.rule].peak_bytes
        memory_ratio = f"{r.peak_bytes / base:9.2f}" if r.peak_bytes and base else f"{'n/a':>9}"
        speed_ratio = f"{r.fps / cut3r[r.length].fps:9.2f}" if r.length in cut3r else f"{'n/a':>9}"
        speed = f"{r.fps:9.1f} {1000 / r.fps:9.1f}"
        print(f"{r.rule:<6} {r.length:>6} {speed} {peak} {memory_ratio} {speed_ratio}")


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HxW, e.g. 384x512") from None
    return height, width


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench-backbone", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto: tiny on CPU, then ttt3r_512 on the GPU if there is one",
    )
    parser.add_argument(
        "--preset", choices=["tiny", "ttt3r_512", "cut3r_224_linear"], help="only this preset"
    )
    parser.add_argument(
        "--size", type=_size, help="HxW, e.g. 384x512 (default: 64x64 tiny, 384x512 ttt3r_512)"
    )
    parser.add_argument("--lengths", type=_positive, nargs="+", default=[16, 64, 256])
    parser.add_argument(
        "--rules", nargs="+", choices=["ttt3r", "cut3r"], default=["ttt3r", "cut3r"]
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="bf16", help="GPU autocast dtype"
    )
    parser.add_argument("--batch", type=_positive, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--outputs", nargs="+", help="output fields to compute (default: the defaults)"
    )
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="also profile N frames")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    runs = []
    if args.device in ("auto", "cpu"):
        runs.append((torch.device("cpu"), args.preset or "tiny"))
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            parser.error("--device cuda but no CUDA device is available")
        runs.append((torch.device("cuda"), args.preset or "ttt3r_512"))
    for device, preset in runs:
        size = args.size or ((64, 64) if preset == "tiny" else (384, 512))
        run_configuration(args, device, preset, size)
    if args.device == "auto" and not torch.cuda.is_available():
        print("\nno CUDA device: the ttt3r_512 GPU run was skipped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
