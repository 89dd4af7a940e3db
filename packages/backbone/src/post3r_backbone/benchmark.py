"""Frames per second and peak memory of streaming inference against sequence length.

    uv run apps/bench-backbone  # tiny on CPU, plus ttt3r_512 in bf16 on a GPU if there is one
    uv run apps/bench-backbone --device cuda --preset ttt3r_512 --lengths 16 64 256
    uv run apps/bench-backbone --preset ttt3r_512 --size 384x512 --lengths 2 --compare-layout
    uv run apps/bench-backbone --preset ttt3r_512 --size 384x512 --lengths 2 --compare-heads

Weights are random (speed does not depend on them). Each run streams T frames through
`model.step` from a fresh state, dropping the outputs as a consumer would, after a few warm-up
frames. Peak memory is the CUDA allocator's peak (weights included) or, on CPU, the peak resident
set size of the process during the run (the kernel's high-water mark, reset before each run).
Ratios in the same run: memory against the shortest sequence (flat = 1.00) and the TTT3R rule's
speed against the CUT3R rule's (the cost of the gate). `--compare-layout` instead alternates the
heads' current token-map layout with the previous one (which made the DPT convolutions run in the
NCHW layout at batch 1) and prints the ratios new/previous; `--compare-heads` alternates the DPT
adapters' current arithmetic with the plain one (every convolution as the original writes it)
and with the heads as they were before both (plain arithmetic and the previous layout).

On the CPU the process keeps freed memory for reuse (`allocator.keep_freed_memory`, as post3r's
CPU apps do; `--cpu-memory unmap` for glibc's default). `--compare-heads`' "old" variant is the
code before issue 18 as a whole: the previous layout, the plain arithmetic, glibc's default
allocator policy and RoPE2D as `auto` chose it then (the reference on the CPU, where "new" and
"plain" get `eager`; Triton on a GPU in all three). Every variant starts from a trimmed heap,
so that one variant's peak memory does not count what another kept.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from post3r_backbone.allocator import keep_freed_memory, release_free_memory, unmap_freed_memory
from post3r_backbone.config import TTT3RConfig
from post3r_backbone.dpt import DPTAdapter
from post3r_backbone.errors import TTT3RConfigError
from post3r_backbone.heads import LinearHead
from post3r_backbone.layers import PatchEmbed
from post3r_backbone.model import TTT3R
from post3r_kernels import ENV_VAR, auto_impl
from post3r_kernels.timing import synchronize

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Result:
    rule: str  # the update rule, or the variant compared ("new", "old", "plain")
    length: int
    fps: float
    peak_bytes: int | None
    faults_per_frame: float = 0.0  # minor page faults of the process per frame (CPU figure)
    cpu_seconds: float = 0.0  # process CPU time per frame, all threads (CPU figure)


def _old_token_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    return tokens.transpose(1, 2).unflatten(2, grid)


def _old_unshuffle(features: torch.Tensor, grid: tuple[int, int], p: int) -> torch.Tensor:
    return F.pixel_shuffle(features.transpose(1, 2).unflatten(2, grid), p)


def _old_patch_tokens(self: PatchEmbed, x: torch.Tensor) -> torch.Tensor:
    return self.proj(x).flatten(2).transpose(1, 2)


@contextmanager
def previous_layout(model: TTT3R) -> Iterator[None]:
    """The layouts as before issue 18, for a same-run comparison only.

    Token maps built as `transpose(1, 2).unflatten(2, grid)` (same values; at batch 1 its
    strides made every DPT convolution run in the NCHW layout), the linear head's
    `pixel_shuffle` on such a map, convolution weights stored NCHW, and the patch embedding's
    tokens left as a transposed view (the encoder's residual stream then ran transposed).
    """
    saved = DPTAdapter.token_map, LinearHead.unshuffle, PatchEmbed.forward
    convolutions = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    setattr(DPTAdapter, "token_map", staticmethod(_old_token_map))  # noqa: B010 (a method)
    setattr(LinearHead, "unshuffle", staticmethod(_old_unshuffle))  # noqa: B010
    setattr(PatchEmbed, "forward", _old_patch_tokens)  # noqa: B010
    for conv in convolutions:
        conv.weight.data = conv.weight.data.contiguous()
    try:
        yield
    finally:
        setattr(DPTAdapter, "token_map", staticmethod(saved[0]))  # noqa: B010
        setattr(LinearHead, "unshuffle", staticmethod(saved[1]))  # noqa: B010
        setattr(PatchEmbed, "forward", saved[2])  # noqa: B010
        for adapter in model.modules():
            if isinstance(adapter, DPTAdapter):
                adapter.weights_channels_last()


CPU_MEMORY = {"keep": keep_freed_memory, "unmap": unmap_freed_memory}


@contextmanager
def previous_rope(model: TTT3R) -> Iterator[None]:
    """RoPE2D as `auto` picked it before the eager implementation: the reference (`torch`)
    wherever `auto` now picks `eager` (the CPU), Triton on a GPU as before. Set through
    POST3R_ROPE2D_IMPL, which `rope2d` reads at every call, unless that already names one."""
    probe = torch.empty(1, 1, 1, 4, device=model.device)
    saved = os.environ.get(ENV_VAR)
    if saved is not None or auto_impl(probe) != "eager":
        yield
        return
    os.environ[ENV_VAR] = "torch"
    try:
        yield
    finally:
        del os.environ[ENV_VAR]


@contextmanager
def cpu_memory(model: TTT3R, policy: str) -> Iterator[None]:
    """A CPU model runs under the glibc allocator `policy` ("keep" or "unmap"), from a trimmed
    heap; the policy stays set afterwards (the next variant sets its own)."""
    if model.device.type == "cpu":
        release_free_memory()
        CPU_MEMORY[policy]()
    yield


@contextmanager
def plain_heads(model: TTT3R) -> Iterator[None]:
    """Every DPT adapter with its plain arithmetic (each convolution as the original writes it,
    at full resolution), for a same-run comparison and as the tests' reference."""
    adapters = [m for m in model.modules() if isinstance(m, DPTAdapter)]
    saved = [adapter.plain_arithmetic for adapter in adapters]
    for adapter in adapters:
        adapter.plain_arithmetic = True
    try:
        yield
    finally:
        for adapter, plain in zip(adapters, saved, strict=True):
            adapter.plain_arithmetic = plain


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


def _reset_peak_resident() -> bool:
    """Reset the kernel's resident high-water mark (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_resident_bytes() -> int | None:
    """VmHWM: the process's peak resident set since the last reset (Linux), else None."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
    return int(match.group(1)) * 1024 if match else None


def stream(
    model: TTT3R,
    pool: torch.Tensor,
    length: int,
    dtype: torch.dtype,
    warmup: int,
    outputs: tuple[str, ...] | None,
) -> tuple[float, int | None, float, float]:
    """Seconds per frame, peak memory, minor page faults and CPU seconds per frame.

    Page faults count memory the process had to map afresh: large temporaries that glibc hands
    back to the OS on every free and maps again on the next frame show up here. CPU seconds
    (the process's user + system time) hardly change when other jobs load the machine, so with
    one thread they compare two variants more steadily than wall-clock frames/s.
    """
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
        # Without a resettable high-water mark, sample the resident set between frames.
        high_water = device.type == "cpu" and _reset_peak_resident()
        peak = _resident_bytes() or 0
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        cpu_start = time.process_time()
        start = time.perf_counter()
        for t in range(length):
            _, state = model.step(pool[t % len(pool)], state, outputs=outputs)
            if device.type == "cpu" and not high_water:
                peak = max(peak, _resident_bytes() or 0)
        synchronize(device)
        seconds = time.perf_counter() - start
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        cpu_seconds = time.process_time() - cpu_start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    elif high_water:
        peak = _peak_resident_bytes() or peak
    return seconds / length, peak or None, faults / length, cpu_seconds / length


def run_configuration(
    args: argparse.Namespace, device: torch.device, preset: str, size: tuple[int, int]
) -> None:
    config = TTT3RConfig.preset(preset, **args.set)
    model = random_model(config, device)
    dtype = DTYPES[args.dtype if device.type == "cuda" else "fp32"]
    pool = torch.rand(4, args.batch, 3, *size, generator=torch.Generator().manual_seed(0)).to(
        device
    )
    outputs = (
        None if not args.outputs else "all" if args.outputs == ["all"] else tuple(args.outputs)
    )
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    changed = "".join(f" {key}={value}" for key, value in args.set.items())
    print(
        f"\n{preset}{changed} on {name}: {size[0]}x{size[1]} (HxW), batch {args.batch}, "
        f"{'autocast ' + args.dtype if dtype != torch.float32 else 'fp32'}, "
        f"{millions:.1f} M parameters ({weights / 2**20:.0f} MiB), "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )
    if args.compare_layout:
        _compare_variants(args, model, pool, dtype, outputs, LAYOUTS, ("layout", "heads' layout"))
    elif args.compare_heads:
        _compare_variants(
            args, model, pool, dtype, outputs, ARITHMETIC, ("heads", "DPT arithmetic")
        )
    else:
        _compare_rules(args, model, pool, dtype, outputs)
    if args.profile:
        _profile(model, pool, dtype, args.profile, outputs)


def _compare_rules(args, model: TTT3R, pool: torch.Tensor, dtype: torch.dtype, outputs) -> None:
    results = []
    for length in args.lengths:  # rules alternate, so their ratio sees the same machine load
        for rule in args.rules:
            model.update_rule = rule
            seconds, peak, _, _ = stream(model, pool, length, dtype, args.warmup, outputs)
            results.append(Result(rule, length, args.batch / seconds, peak))
    _print_table(sorted(results, key=lambda r: args.rules.index(r.rule)))


@contextmanager
def _stacked(*contexts: AbstractContextManager[None]) -> Iterator[None]:
    with ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield


Variants = dict[str, Callable[[TTT3R], AbstractContextManager[None]]]
# The current code first, the baseline the ratios are taken against last.
LAYOUTS: Variants = {"new": lambda model: nullcontext(), "old": previous_layout}
ARITHMETIC: Variants = {
    "new": lambda model: cpu_memory(model, "keep"),
    "plain": lambda model: _stacked(cpu_memory(model, "keep"), plain_heads(model)),
    "old": lambda model: _stacked(
        cpu_memory(model, "unmap"),
        plain_heads(model),
        previous_layout(model),
        previous_rope(model),
    ),
}


def _compare_variants(
    args,
    model: TTT3R,
    pool: torch.Tensor,
    dtype: torch.dtype,
    outputs,
    variants: Variants,
    names: tuple[str, str],
) -> None:
    """The current code vs a baseline variant, alternated `--repeats` times per length;
    `names`: the table's first column and its title."""
    model.update_rule = args.rules[0]
    results = []
    for length in args.lengths:
        for _ in range(args.repeats):  # alternate, so both see the same machine load
            for name, variant in variants.items():
                with variant(model):
                    measured = stream(model, pool, length, dtype, args.warmup, outputs)
                seconds, peak, faults, cpu = measured
                results.append(Result(name, length, args.batch / seconds, peak, faults, cpu))
    _print_variant_table(results, args.rules[0], names, baseline=list(variants)[-1])


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _print_variant_table(
    results: list[Result], rule: str, names: tuple[str, str], baseline: str
) -> None:
    """Per variant and length: medians over runs, max peak memory, and ratios to the baseline."""
    column, what = names
    columns = ("runs", "frames/s", "cpu s/fr", "peak MiB", "faults/fr")
    ratios = (f"fps/{baseline}", f"cpu/{baseline}", f"mem/{baseline}")
    header = f"{column:<6} {'frames':>6} " + " ".join(f"{c:>9}" for c in columns + ratios)
    print(f"{what}, {rule} rule (medians over runs; cpu: process CPU seconds per frame):")
    print(header)
    print("-" * len(header))
    groups: dict[tuple[str, int], list[Result]] = {}
    for r in results:
        groups.setdefault((r.rule, r.length), []).append(r)
    summary = {}
    for key, runs in groups.items():
        peaks = [r.peak_bytes for r in runs if r.peak_bytes]
        summary[key] = (
            len(runs),
            _median([r.fps for r in runs]),
            _median([r.cpu_seconds for r in runs]),
            max(peaks) if peaks else None,
            _median([r.faults_per_frame for r in runs]),
        )
    for (name, length), (count, fps, cpu, peak, faults) in sorted(
        summary.items(), key=lambda item: item[0][1]
    ):
        _, old_fps, old_cpu, old_peak, _ = summary[baseline, length]
        memory = f"{peak / 2**20:9.0f}" if peak else f"{'n/a':>9}"
        memory_ratio = f"{peak / old_peak:9.2f}" if peak and old_peak else f"{'n/a':>9}"
        cpu_ratio = f"{cpu / old_cpu:9.2f}" if old_cpu else f"{'n/a':>9}"
        print(
            f"{name:<6} {length:>6} {count:>9} {fps:9.3f} {cpu:9.2f} {memory} {faults:9.0f} "
            f"{fps / old_fps:9.2f} {cpu_ratio} {memory_ratio}"
        )


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


def _override(text: str) -> tuple[str, object]:
    """KEY=VALUE for a TTT3RConfig field; VALUE is a Python literal or else a string."""
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE, e.g. enc_depth=6")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


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
        "--outputs",
        nargs="+",
        help="output fields to compute, or all (default: the model's defaults, every head)",
    )
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="also profile N frames")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    parser.add_argument(
        "--cpu-memory",
        choices=sorted(CPU_MEMORY),
        default="keep",
        help="glibc allocator policy on the CPU: keep freed memory for reuse (post3r's CPU apps) "
        "or unmap it (glibc's default); --compare-heads sets its own per variant (new and "
        "plain keep, old unmaps)",
    )
    parser.add_argument(
        "--set",
        type=_override,
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="change config fields of the preset, e.g. --set enc_depth=6 dec_depth=6",
    )
    compare = parser.add_mutually_exclusive_group()
    compare.add_argument(
        "--compare-layout",
        action="store_true",
        help="alternate the heads' current and previous token-map layouts (first --rules rule)",
    )
    compare.add_argument(
        "--compare-heads",
        action="store_true",
        help="alternate the DPT adapters' current arithmetic, the plain one, and the plain one "
        "with the previous layout and glibc's default allocator policy (first --rules rule)",
    )
    parser.add_argument(
        "--repeats",
        type=_positive,
        default=1,
        help="with --compare-layout/--compare-heads: alternations per length (medians shown)",
    )
    args = parser.parse_args(argv)
    args.set = dict(args.set)
    try:
        TTT3RConfig.preset(args.preset or "tiny", **args.set)
    except (TTT3RConfigError, TypeError) as error:
        parser.error(f"--set: {error}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device in ("auto", "cpu"):
        CPU_MEMORY[args.cpu_memory]()

    runs = []
    if args.device in ("auto", "cpu"):
        runs.append((torch.device("cpu"), args.preset or "tiny"))
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            parser.error("--device cuda but no CUDA device is available")
        runs.append((torch.device("cuda"), args.preset or "ttt3r_512"))
    for device, preset in runs:
        size = args.size or ((64, 64) if preset == "tiny" else (384, 512))
        try:
            run_configuration(args, device, preset, size)
        except ValueError as error:  # e.g. a --size the model cannot take: a usage error
            parser.error(str(error))
    if args.device == "auto" and not torch.cuda.is_available():
        print("\nno CUDA device: the ttt3r_512 GPU run was skipped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
