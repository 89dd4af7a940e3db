"""Forward+backward time and peak memory of the slot pipeline, per component.

Defaults are YT-VIS scale (B=8, T=4, N=37·37, D=768, K=7, Ds=128). Every component runs in a
baseline setting (fp32 eager) and a variant measured in the same run (bf16 autocast by default,
or torch.compile), and the table prints their ratio.

    uv run apps/bench-slots            # the GPU if there is one, else the CPU
    PYTHONPATH=packages/kernels/src:packages/slots/src \
        python3 -m post3r_slots.benchmark --device cuda

Memory is the peak above what was allocated before the step (inputs and weights): from the
CUDA caching allocator on a GPU; on a CPU from the peak resident set of a forked child process
that runs only that measurement.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import post3r_slots as ps
from post3r_kernels.timing import synchronize

MiB = 2**20


@dataclass(frozen=True)
class Sizes:
    batch: int
    frames: int
    patches: int
    feature_dim: int
    slots: int
    slot_dim: int
    decoder_hidden: tuple[int, ...]
    resolution: tuple[int, int]
    target_resolution: tuple[int, int]

    def describe(self) -> str:
        hidden = "x".join(map(str, self.decoder_hidden))
        return (
            f"B={self.batch} T={self.frames} N={self.patches} D={self.feature_dim} "
            f"K={self.slots} Ds={self.slot_dim}; MLP decoder hidden {hidden}; pointmap "
            f"{self.resolution[0]}x{self.resolution[1]}, target "
            f"{self.target_resolution[0]}x{self.target_resolution[1]}"
        )


@dataclass(frozen=True)
class Measurement:
    milliseconds: float
    peak_mib: float


Step = Callable[[], torch.Tensor]
"""Runs one forward pass and returns the scalar to backpropagate."""

Workload = tuple[Step, list[torch.Tensor]]
"""A step and the tensors it trains (weights and input leaves), whose grads each step resets."""


def _leaf(*shape: int, device: torch.device) -> torch.Tensor:
    return torch.randn(*shape, device=device, requires_grad=True)


def _processor_workload(processor: torch.nn.Module, sizes: Sizes, device: torch.device) -> Workload:
    processor = processor.to(device)
    features = _leaf(sizes.batch, sizes.frames, sizes.patches, sizes.feature_dim, device=device)
    step = lambda: processor(features).slots.float().square().mean()  # noqa: E731
    return step, [*processor.parameters(), features]


def _slot_attention_step(sizes: Sizes, device: torch.device) -> Workload:
    s = sizes
    processor = ps.SlotVideoProcessor(
        ps.FixedLearnedInit(s.slots, s.slot_dim),
        ps.SlotAttention(s.feature_dim, s.slot_dim, iterations=2, first_frame_iterations=3),
        ps.TransformerPredictor(s.slot_dim),
    )
    return _processor_workload(processor, sizes, device)


def _recurrent_step(sizes: Sizes, device: torch.device) -> Workload:
    s = sizes
    side = int(s.patches**0.5)
    grid = (side, s.patches // side) if side * (s.patches // side) == s.patches else (1, s.patches)
    processor = ps.SlotVideoProcessor(
        ps.FixedLearnedInit(s.slots, s.slot_dim),
        ps.RecurrentSlotCorrector(s.feature_dim, s.slot_dim, num_blocks=3, grid_size=grid),
        detach_between_frames=True,
    )
    return _processor_workload(processor, sizes, device)


def _mlp_decoder_step(sizes: Sizes, device: torch.device) -> Workload:
    s = sizes
    decoder = ps.MLPDecoder(s.slot_dim, s.feature_dim, s.patches, s.decoder_hidden).to(device)
    slots = _leaf(s.batch, s.frames, s.slots, s.slot_dim, device=device)
    return (lambda: decoder(slots).reconstruction.float().square().mean()), [
        *decoder.parameters(),
        slots,
    ]


def _pointmap_decoder_step(sizes: Sizes, device: torch.device) -> Workload:
    s = sizes
    decoder = ps.PointmapDecoder(s.slot_dim, resolution=s.resolution, pose_dim=7).to(device)
    slots = _leaf(s.batch, s.frames, s.slots, s.slot_dim, device=device)
    pose = torch.randn(s.batch, s.frames, 7, device=device)
    return (lambda: decoder(slots, pose).pointmap.float().square().mean()), [
        *decoder.parameters(),
        slots,
    ]


def _losses_step(sizes: Sizes, device: torch.device) -> Workload:
    s = sizes
    frames = (s.batch, s.frames)
    reconstruction = _leaf(*frames, s.patches, s.feature_dim, device=device)
    features = torch.randn(*frames, s.patches, s.feature_dim, device=device)
    pointmap = _leaf(*frames, *s.resolution, 3, device=device)
    target = torch.randn(*frames, *s.target_resolution, 3, device=device)
    confidence = 1 + torch.rand(*frames, *s.target_resolution, device=device).exp()
    slots = _leaf(*frames, s.slots, s.slot_dim, device=device)

    def step() -> torch.Tensor:
        feature = ps.feature_reconstruction_loss(reconstruction, features).loss
        points = ps.pointmap_loss(pointmap, target, confidence=confidence).loss
        return feature + points + ps.slot_contrastive_loss(slots).loss

    return step, [reconstruction, pointmap, slots]


COMPONENTS: dict[str, Callable[[Sizes, torch.device], Workload]] = {
    "slot attention + predictor": _slot_attention_step,
    "recurrent slot corrector (POST3R)": _recurrent_step,
    "MLP feature decoder": _mlp_decoder_step,
    "pointmap decoder": _pointmap_decoder_step,
    "losses (MSE, pointmap, contrastive)": _losses_step,
}
PIPELINE = (
    "slot attention + predictor",
    "MLP feature decoder",
    "pointmap decoder",
    "losses (MSE, pointmap, contrastive)",
)


def _runner(workload: Workload, device: torch.device, variant: str) -> Callable[[], float]:
    """One training-like step (grads reset, forward, backward); returns its time in ms."""
    step, leaves = workload
    if variant == "compile":
        step = torch.compile(step)
    autocast = variant == "bf16"

    def run() -> float:
        _clear_grads(leaves)
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = step()
        loss.backward()
        synchronize(device)
        return (time.perf_counter() - start) * 1000

    return run


def _clear_grads(leaves: list[torch.Tensor]) -> None:
    for leaf in leaves:
        leaf.grad = None


def measure(
    component: str, sizes: Sizes, device: torch.device, variant: str, warmup: int, repeats: int
) -> Measurement:
    """Build `component` and measure its forward+backward in this process.

    Memory is measured over the timed steps only, so compilation during warm-up is excluded.
    """
    torch.manual_seed(0)
    workload = COMPONENTS[component](sizes, device)
    run = _runner(workload, device, variant)
    for _ in range(warmup):
        run()
    _clear_grads(workload[1])
    before = _memory_baseline(device)
    milliseconds = statistics.median(run() for _ in range(repeats))
    return Measurement(milliseconds, (_memory_peak(device) - before) / MiB)


def _memory_baseline(device: torch.device) -> int:
    """Bytes in use now, after resetting the peak counter."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:  # Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass  # the peak then also covers the warm-up steps
    return _status_bytes("VmRSS")


def _memory_peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _status_bytes("VmHWM")


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (Linux), else the process's peak resident set."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def _measure_in_child(connection, *args) -> None:
    try:
        connection.send(measure(*args))
    except BaseException as error:  # report any failure (e.g. MemoryError) to the parent
        connection.send(f"{type(error).__name__}: {error}")
    finally:
        connection.close()


def measure_isolated(*args) -> Measurement | str:
    """CPU: measure in a child process so its peak resident memory is this measurement's alone.

    Children are forked from a forkserver that has imported torch but never computed, which is
    fast (no re-import) and safe (no OpenMP state inherited from a parent that computed).
    Returns an error string if the child fails or is killed (e.g. out of memory).
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "post3r_slots.benchmark"])
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_measure_in_child, args=(sender, *args))
    child.start()
    sender.close()
    try:
        result = receiver.recv()
    except EOFError:
        result = None
    child.join()
    return result or f"child process died with exit code {child.exitcode} (out of memory?)"


def _format(result: Measurement | str | None, field: str) -> str:
    if isinstance(result, Measurement):
        return f"{getattr(result, field):10.1f}"
    return f"{'n/a':>10}"


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or not denominator:
        return f"{'n/a':>8}"
    return f"{numerator / denominator:7.2f}x"


def _value(result: Measurement | str | None, field: str) -> float | None:
    return getattr(result, field) if isinstance(result, Measurement) else None


def run(args: argparse.Namespace) -> int:
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda given but no CUDA/ROCm device is available", file=sys.stderr)
        return 2
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    repeats = args.repeats if args.repeats is not None else (10 if device.type == "cuda" else 1)
    sizes = Sizes(
        args.batch_size,
        args.frames,
        args.patches,
        args.feature_dim,
        args.slots,
        args.slot_dim,
        tuple(args.decoder_hidden),
        tuple(args.resolution),
        tuple(args.target_resolution),
    )
    variants = ("fp32", args.compare)
    print(f"post3r-slots benchmark on {_device_name(device)}; {sizes.describe()}")
    print(
        f"forward+backward per step, median of {repeats} (after {warmup} warm-up); memory = "
        f"peak above inputs and weights; ratios = fp32 / {args.compare}"
    )
    header = (
        f"{'component':36}" + "".join(f"{f'{v} ms':>10}{f'{v} MiB':>10}" for v in variants)
        + f"{'speed-up':>9}{'memory':>9}"
    )  # fmt: skip
    print(header)
    print("-" * len(header))
    totals = {variant: [0.0, 0.0] for variant in variants}
    for component in COMPONENTS:
        results = {}
        for variant in variants:
            arguments = (component, sizes, device, variant, warmup, repeats)
            result = measure(*arguments) if device.type == "cuda" else measure_isolated(*arguments)
            if isinstance(result, str):
                print(f"  {component} [{variant}] failed: {result}", file=sys.stderr)
            results[variant] = result
            if component in PIPELINE and isinstance(result, Measurement):
                totals[variant][0] += result.milliseconds
                totals[variant][1] = max(totals[variant][1], result.peak_mib)
        _print_row(component, results, variants)
    summary = {variant: Measurement(*totals[variant]) for variant in variants}
    print("-" * len(header))
    _print_row("pipeline (sum of rows except POST3R)", summary, variants)
    print("pipeline memory is the largest component's peak (they run one after another).")
    return 0


def _print_row(name: str, results: dict, variants: tuple[str, str]) -> None:
    base, other = (results.get(v) for v in variants)
    cells = "".join(
        _format(results.get(v), "milliseconds") + _format(results.get(v), "peak_mib")
        for v in variants
    )
    speed = _ratio(_value(base, "milliseconds"), _value(other, "milliseconds"))
    memory = _ratio(_value(base, "peak_mib"), _value(other, "peak_mib"))
    print(f"{name:36}{cells} {speed} {memory}", flush=True)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda)"
    return f"CPU ({torch.get_num_threads()} threads)"


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum`."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its 'invalid int value' message
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench-slots",
        description="Forward+backward time and peak memory of the post3r-slots pipeline.",
    )
    parser.add_argument(
        "--device", default="auto", help="auto, cpu or cuda (default: auto: cuda if available)"
    )
    parser.add_argument(
        "--compare",
        choices=("bf16", "compile"),
        default="bf16",
        help="variant measured against fp32 eager: bf16 autocast or torch.compile (default: bf16)",
    )
    parser.add_argument("--batch-size", type=_at_least(1), default=8)
    parser.add_argument(
        "--frames", type=_at_least(2), default=4, help="at least 2 (the contrastive loss)"
    )
    parser.add_argument("--patches", type=_at_least(1), default=37 * 37)
    parser.add_argument("--feature-dim", type=_at_least(1), default=768)
    parser.add_argument("--slots", type=_at_least(1), default=7)
    parser.add_argument("--slot-dim", type=_at_least(1), default=128)
    parser.add_argument(
        "--decoder-hidden",
        type=_at_least(1),
        nargs="+",
        default=[1024, 1024, 1024],
        metavar="WIDTH",
    )
    parser.add_argument(
        "--resolution", type=_at_least(1), nargs=2, default=[128, 128], metavar=("H", "W")
    )
    parser.add_argument(
        "--target-resolution", type=_at_least(1), nargs=2, default=[518, 518], metavar=("H", "W"),
        help="resolution of the pointmap target in the losses row (default: 518 518)",
    )  # fmt: skip
    parser.add_argument(
        "--warmup", type=_at_least(0), help="warm-up steps (default: 1 on CPU, 3 on GPU)"
    )
    parser.add_argument(
        "--repeats", type=_at_least(1), help="timed steps (default: 1 on CPU, 10 on GPU)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
