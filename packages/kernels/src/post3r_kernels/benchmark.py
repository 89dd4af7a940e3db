"""Benchmark the RoPE2D implementations against a device copy of the same size.

`uv run apps/bench-rope2d` (or `python -m post3r_kernels.benchmark`) times the forward and the
forward+backward of each implementation on model-sized inputs: (B*T, N, H, D) tokens stored as
the backbone stores q/k, a (B, N, H, D) projection viewed as (B, H, N, D). Figures:

* time: on a GPU the median with a cold L2 (a 256 MB buffer is rewritten before every timed
  call), on a CPU the fastest call;
* achieved bandwidth = minimal bytes / time, where minimal bytes are one read and one write of
  the tokens per pass (plus the positions): the floor for any implementation;
* that bandwidth as a percentage of `dst.copy_(src)` of the same size, measured in the same run;
* speed-up over the eager torch reference and over `torch.compile` of it.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from post3r_kernels import rope2d, rope2d_impls, rope2d_torch
from post3r_kernels.dispatch import TRITON_INSTALLED

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (B*T, N, H, D): the backbone's encoder (16 heads) and decoder (12 heads), 512x384 / 512x512.
FULL_SHAPES = [(32, n, h, 64) for n in (768, 1024) for h in (16, 12)]
SMALL_SHAPES = [(4, n, 4, 64) for n in (192, 256)]
_FLUSH_BYTES = 256 * 1024 * 1024

Rope = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Case:
    """One benchmark input and the figures that do not depend on the implementation."""

    shape: tuple[int, int, int, int]
    dtype_name: str
    x: torch.Tensor
    positions: torch.Tensor
    grad: torch.Tensor
    copy_gbps: float = 0.0

    @property
    def pass_bytes(self) -> int:
        """Minimal traffic of one pass (forward or backward): read x, write the result."""
        tokens = 2 * self.x.numel() * self.x.element_size()
        return tokens + self.positions.numel() * self.positions.element_size()


@dataclass
class Timing:
    """Milliseconds of a forward and of a forward+backward (see call_ms; None: not measured)."""

    forward: float
    forward_backward: float | None


def _rope_with(x: torch.Tensor, positions: torch.Tensor, impl: str) -> torch.Tensor:
    return rope2d(x, positions, impl=impl)


def call_ms(fn: Callable[[], object], device: torch.device, reps: int, warmup: int) -> float:
    """Time of one call of `fn` in ms: on a GPU the median over CUDA events with a flushed L2
    cache, on a CPU the fastest call (the least disturbed by other processes)."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return min(times)  # on a shared CPU the fastest call is the least disturbed one
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device=device)
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(2)] for _ in range(reps)]
    for begin, finish in events:
        flush.zero_()
        begin.record()
        fn()
        finish.record()
    torch.cuda.synchronize(device)
    return statistics.median(begin.elapsed_time(finish) for begin, finish in events)


def make_case(shape: tuple[int, int, int, int], dtype_name: str, device: torch.device) -> Case:
    """Tokens as a (B, H, N, D) view of (B, N, H, D) storage; grid positions and a pose token."""
    batch, tokens, heads, dim = shape
    dtype = DTYPES[dtype_name]
    x = torch.randn(batch, tokens, heads, dim, device=device, dtype=dtype).transpose(1, 2)
    index = torch.arange(tokens, device=device)
    positions = torch.stack((index // 32, index % 32), dim=-1).repeat(batch, 1, 1)
    positions[:, 0] = -1
    return Case(shape, dtype_name, x, positions, torch.randn_like(x))


def measure_copy(case: Case, reps: int, warmup: int) -> None:
    src = torch.randn(case.x.numel(), device=case.x.device).to(case.x.dtype)
    dst = torch.empty_like(src)
    ms = call_ms(lambda: dst.copy_(src), src.device, reps, warmup)
    case.copy_gbps = gbps(2 * src.numel() * src.element_size(), ms)


def time_impl(fn: Rope, case: Case, reps: int, warmup: int, backward: bool) -> Timing:
    x, positions, device = case.x, case.positions, case.x.device
    with torch.no_grad():
        forward = call_ms(lambda: fn(x, positions), device, reps, warmup)
    if not backward:
        return Timing(forward, None)
    leaf = x.detach().requires_grad_()

    def forward_backward() -> None:
        torch.autograd.grad(fn(leaf, positions), leaf, case.grad)

    return Timing(forward, call_ms(forward_backward, device, reps, warmup))


def selected_shapes(args: argparse.Namespace) -> list[tuple[int, int, int, int]]:
    return args.shapes or (SMALL_SHAPES if args.size == "small" else FULL_SHAPES)


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def implementations(names: Sequence[str]) -> dict[str, Rope]:
    """The implementations to time; `compiled` is a fresh torch.compile per shape."""
    chosen: dict[str, Rope] = {}
    for name in names:
        if name == "compiled":
            torch._dynamo.reset()  # a clean cache per shape: no shape falls back to eager
            chosen[name] = torch.compile(rope2d_torch, dynamic=False)
        else:
            chosen[name] = functools.partial(_rope_with, impl=name)
    return chosen


_METRICS = f"{'µs':>8} {'GB/s':>6} {'%copy':>5} {'×torch':>6} {'×comp':>6}"
HEADER = (
    f"{'B*T':>4} {'N':>5} {'H':>3} {'D':>3} {'dtype':>5} {'impl':>9} "
    f"| fwd {_METRICS} | fwd+bwd {_METRICS}"
)


def format_row(case: Case, impl: str, timings: dict[str, Timing]) -> str:
    def metrics(kind: str, nbytes: int) -> str:
        ms = getattr(timings[impl], kind)
        if ms is None:
            return " ".join(f"{'-':>{w}}" for w in (8, 6, 5, 6, 6))
        achieved = gbps(nbytes, ms)
        ratios = []
        for base in ("torch", "compiled"):
            base_ms = getattr(timings[base], kind) if base in timings else None
            ratios.append(f"{base_ms / ms:6.2f}" if base_ms else f"{'-':>6}")
        return (
            f"{ms * 1e3:8.1f} {achieved:6.1f} {100 * achieved / case.copy_gbps:5.1f} "
            + " ".join(ratios)
        )

    batch, tokens, heads, dim = case.shape
    return (
        f"{batch:>4} {tokens:>5} {heads:>3} {dim:>3} {case.dtype_name:>5} {impl:>9} "
        f"| fwd {metrics('forward', case.pass_bytes)} "
        f"| fwd+bwd {metrics('forward_backward', 2 * case.pass_bytes)}"
    )


def available_impls(names: list[str], device: torch.device) -> list[str]:
    if "triton" in names and device.type != "cuda":
        print("note: the triton implementation needs a CUDA or ROCm GPU; timing torch paths only")
        names.remove("triton")
    elif "triton" in names and not TRITON_INSTALLED:
        print("note: triton is not installed; timing the torch paths only")
        names.remove("triton")
    return names


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    names = available_impls(args.impls, device)
    print(describe_device(device), f"| reps={args.reps}")
    print("tokens stored (B, N, H, D), passed as (B, H, N, D) views; bytes: read+write x per pass")
    print(HEADER)
    rows: list[tuple[Case, Timing]] = []
    for shape in selected_shapes(args):
        for dtype_name in args.dtypes:
            case = make_case(shape, dtype_name, device)
            measure_copy(case, args.reps, args.warmup)
            print(f"{'':>18} {dtype_name:>5} {'copy':>9} | {case.copy_gbps:.1f} GB/s device copy")
            timings: dict[str, Timing] = {}
            for name, fn in implementations(names).items():
                backward = not args.forward_only
                timings[name] = time_impl(fn, case, args.reps, args.warmup, backward)
                print(format_row(case, name, timings), flush=True)
            if "triton" in timings:
                rows.append((case, timings["triton"]))
    summarize(rows)
    return 0


def summarize(rows: list[tuple[Case, Timing]]) -> None:
    """The Triton path's bandwidth range as a share of the copy, over all shapes."""
    for label, kind, passes in (
        ("forward", "forward", 1),
        ("forward+backward", "forward_backward", 2),
    ):
        shares = [
            100 * gbps(passes * case.pass_bytes, ms) / case.copy_gbps
            for case, timing in rows
            if (ms := getattr(timing, kind)) is not None
        ]
        if shares:
            print(f"triton {label}: {min(shares):.1f}-{max(shares):.1f} % of copy bandwidth")


def sweep(args: argparse.Namespace) -> int:
    """Rank Triton launch configurations by forward time (a GPU tuning aid)."""
    from post3r_kernels.triton_rope2d import LaunchConfig, default_config, launch_rope2d

    device = torch.device(args.device)
    if device.type != "cuda":
        print("--sweep needs a CUDA or ROCm GPU")
        return 2
    print(describe_device(device))
    configs = [
        LaunchConfig(block_n, block_h, warps)
        for block_n in (16, 32, 64, 128)
        for block_h in (1, 2, 4, 8)
        for warps in (2, 4, 8)
    ]
    for shape in selected_shapes(args):
        for dtype_name in args.dtypes:
            case = make_case(shape, dtype_name, device)
            measure_copy(case, args.reps, args.warmup)
            default = default_config(shape[3] // 4, 64 if torch.version.hip else 32)

            def forward_ms(config: LaunchConfig, case: Case = case) -> float:
                call = lambda: launch_rope2d(case.x, case.positions, 100.0, config=config)  # noqa: E731
                return call_ms(call, device, args.reps, args.warmup)

            ranked = sorted((forward_ms(config), config) for config in configs)
            print(f"{shape} {dtype_name}: copy {case.copy_gbps:.0f} GB/s")
            for ms, config in [*ranked[:5], *[item for item in ranked if item[1] == default]]:
                share = 100 * gbps(case.pass_bytes, ms) / case.copy_gbps
                mark = " (default)" if config == default else ""
                print(f"  {config}: {ms * 1e3:7.1f} µs {share:5.1f} % of copy{mark}")
    return 0


def describe_device(device: torch.device) -> str:
    versions = f"torch {torch.__version__}"
    for distribution in ("triton", "pytorch-triton-rocm", "pytorch-triton"):
        try:
            versions += f", {distribution} {importlib.metadata.version(distribution)}"
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    if device.type == "cuda":
        return f"device: {torch.cuda.get_device_name(device)} ({versions})"
    return f"device: CPU, {torch.get_num_threads()} threads ({versions})"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(
        prog="bench-rope2d",
        description="Time RoPE2D implementations (eager torch, torch.compile, Triton) "
        "against the bandwidth of a device copy.",
    )
    parser.add_argument(
        "--device", default="cuda" if on_gpu else "cpu", help="cuda (ROCm too) or cpu"
    )
    parser.add_argument(
        "--size",
        choices=("full", "small"),
        default="full" if on_gpu else "small",
        help="full: B*T=32, N in (768, 1024), H in (16, 12), D=64; small: B*T=4, N in (192, 256), "
        "H=4, D=64 (default: full on a GPU, small on CPU)",
    )
    parser.add_argument(
        "--shapes", help="instead of --size: 'BT,N,H,D' items separated by ';', e.g. '8,769,12,48'"
    )
    parser.add_argument(
        "--dtypes", default="bf16,fp32", help=f"comma-separated: {','.join(DTYPES)}"
    )
    parser.add_argument(
        "--impls", default="torch,eager,compiled,triton", help="comma-separated names"
    )
    parser.add_argument("--reps", type=int, help="timed calls per figure (default: 50 GPU, 5 CPU)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first (compiles)")
    parser.add_argument(
        "--threads", type=int, help="CPU threads for torch (1 is steadiest on a busy machine)"
    )
    parser.add_argument("--forward-only", action="store_true", help="skip forward+backward")
    parser.add_argument("--sweep", action="store_true", help="rank Triton launch configs (GPU)")
    args = parser.parse_args(argv)
    args.shapes = parse_shapes(parser, args.shapes) if args.shapes else None
    args.dtypes = [name for name in args.dtypes.split(",") if name]
    args.impls = [name for name in args.impls.split(",") if name]
    if unknown := sorted(set(args.dtypes) - set(DTYPES)):
        parser.error(f"--dtypes: unknown {unknown}; choose from {sorted(DTYPES)}")
    if unknown := sorted(set(args.impls) - set(rope2d_impls())):
        parser.error(f"--impls: unknown {unknown}; choose from {list(rope2d_impls())}")
    if (args.reps is not None and args.reps < 1) or args.warmup < 0:
        parser.error("--reps must be >= 1 and --warmup >= 0")
    if args.device.startswith("cuda") and not on_gpu:
        parser.error("--device cuda: no CUDA or ROCm device is visible to torch")
    args.reps = args.reps or (50 if args.device.startswith("cuda") else 5)
    return args


def parse_shapes(parser: argparse.ArgumentParser, text: str) -> list[tuple[int, int, int, int]]:
    shapes = []
    for item in text.split(";"):
        try:
            shape = tuple(int(size) for size in item.split(","))
        except ValueError:
            shape = ()
        if len(shape) != 4 or min(shape) < 1 or shape[3] % 4:
            parser.error(f"--shapes: {item!r} is not 'BT,N,H,D' (positive, D a multiple of 4)")
        shapes.append(shape)
    return shapes


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `uv run apps/bench-rope2d`; returns the exit status."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return sweep(args) if args.sweep else run(args)


if __name__ == "__main__":
    sys.exit(main())
