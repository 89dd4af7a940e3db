"""`bash scripts/gpu-check.sh [--cpu-tiny]`: the GPU path tested and measured in one run, one table.

Steps, in order, each a subprocess with its own time limit (7 minutes in all, for an 8-minute
budget on an H200): the Triton kernel tests on the device (1 min), `bench-rope2d` (75 s),
`bench-backbone` with ttt3r_512 at 512x384 bf16 over 16/64/256 frames (2 min), its DPT heads'
arithmetic now, plain and before issue 18 (`--compare-heads`, 45 s), `bench-train`
with ytvis2021 at batch 4, 11 slots, clips of 6, online and cached teacher (2 min). Alongside,
on the CPU, the memory estimate `apps/doctor` makes for that training step with each teacher,
so the table shows it next to the measured peaks. `--cpu-tiny` runs the same steps on the CPU
at tiny sizes (CI does, to keep the script working where there is no GPU). The exit status is
1 when a step failed or ran out of time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from post3r_train.benchmark_teachers import CPU_TINY
from post3r_train.memory_estimate import human_bytes

ROOT = Path(__file__).resolve().parents[4]
OK, FAILED, TIMEOUT = "ok", "FAILED", "TIMEOUT"
TRAIN_SETTING = ["dataset.batch_size=4", "model.num_slots=11", "dataset.chunk_size=6"]


@dataclass
class Row:
    """One line of the summary: a step's item, its status and its figures."""

    step: str
    status: str
    item: str
    result: str


@dataclass
class Step:
    """A command to run with a time limit, and how to turn its output into rows."""

    name: str
    command: list[str]
    timeout_s: float
    parse: Callable[[str], list[Row]]
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    step: Step
    returncode: int | None  # None: killed at the time limit
    output: str
    seconds: float


def app(name: str, *args: str) -> list[str]:
    """`python apps/<name> args`: what `uv run apps/<name>` runs, in this interpreter."""
    return [sys.executable, str(ROOT / "apps" / name), *args]


# ----------------------------------------------------------------------------------------------
# Parsers: a step's printed figures -> rows


def parse_pytest(step: str, item: str) -> Callable[[str], list[Row]]:
    def parse(output: str) -> list[Row]:
        summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed)", line)]
        result = summary[-1].strip("= ") if summary else "no pytest summary"
        status = OK if summary and "failed" not in result and "error" not in result else FAILED
        return [Row(step, status, item, result)]

    return parse


_ROPE_ROW = re.compile(
    r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\w+)\s+(\w+) \| fwd (.*?) \| fwd\+bwd (.*)$"
)


def _rope_figures(text: str) -> str:
    values = text.split()
    if values[0] == "-":
        return "-"
    _, gbps, share, reference, compiled = values
    versus = f", x{reference} torch" + (f", x{compiled} compile" if compiled != "-" else "")
    return f"{float(gbps):.3g} GB/s = {share} % of copy{versus}"


def parse_rope2d(output: str) -> list[Row]:
    """The fastest implementation's row per shape and dtype (Triton's when it ran)."""
    rows: dict[tuple[str, str], tuple[str, str]] = {}
    for line in output.splitlines():
        match = _ROPE_ROW.match(line)
        if not match:
            continue
        *shape, dtype, impl, forward, both = match.groups()
        key = ("x".join(shape), dtype)
        if key not in rows or impl == "triton":
            rows[key] = (impl, f"fwd {_rope_figures(forward)} | fwd+bwd {_rope_figures(both)}")
    return [
        Row("rope2d", OK, f"{impl} {dtype} {shape}", figures)
        for (shape, dtype), (impl, figures) in rows.items()
    ]


_BACKBONE_HEAD = re.compile(r"^(\S+) on (.+?): (\d+x\d+) \(HxW\).*?(autocast \w+|fp32)")
_BACKBONE_ROW = re.compile(r"^(ttt3r|cut3r)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+(\S+)\s+(\S+)")


def _backbone_title(line: str) -> str | None:
    """The title "<preset> <dtype> <HxW>" of a bench-backbone configuration line, else None."""
    if head := _BACKBONE_HEAD.match(line.strip()):
        preset, _, size, dtype = head.groups()
        return f"{preset} {dtype.removeprefix('autocast ')} {size}"
    return None


def parse_backbone(output: str) -> list[Row]:
    """Frames/s and peak memory per sequence length."""
    rows, title = [], "backbone"
    for line in output.splitlines():
        if heading := _backbone_title(line):
            title = heading
        elif row := _BACKBONE_ROW.match(line):
            rule, frames, fps, _, peak, ratio = row.groups()
            result = f"{float(fps):.1f} frames/s, peak {peak} MiB (x{ratio} of the shortest)"
            rows.append(Row("backbone", OK, f"{title} {rule}, {frames} frames", result))
    return rows


_HEADS_ROW = re.compile(
    r"^(new|plain|old)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+(\S+)\s+(\S+)\s+(\S+)\s+([\d.]+)\s+(\S+)\s+(\S+)"
)
_HEADS_MEANING = {"new": "now", "plain": "original's convolutions", "old": "before issue 18"}


def parse_heads(output: str) -> list[Row]:
    """bench-backbone --compare-heads: frames/s and peak memory of each variant of the DPT
    heads, against the heads before issue 18 (the "old" variant)."""
    rows, title = [], "heads"
    for line in output.splitlines():
        if heading := _backbone_title(line):
            title = heading
        elif row := _HEADS_ROW.match(line):
            name, frames, _, fps, _, peak, _, speed, _, memory = row.groups()
            rows.append(
                Row(
                    "heads",
                    OK,
                    f"{title} DPT heads {name} ({_HEADS_MEANING[name]}), {frames} frames",
                    f"{float(fps):.1f} frames/s (x{speed} of old), peak {peak} MiB "
                    f"(x{memory} of old)",
                )
            )
    return rows


_TRAIN_LABELS = re.compile(r"steps/s|ms/step|frozen %|peak GiB|train M|samples/s|[^\s]+")
_TRAIN_ROW = re.compile(r"^(.+?)\s+(cpu|cuda\S*)\s+(\d+)x(\d+)x(\d+)x(\d+)\s+(.*)$")


_TEACHER_ROW = re.compile(r"^(online|cached)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\S+)\s*$")


def parse_train(output: str) -> list[Row]:
    """Steps/s, samples/s and peak memory of each case of bench-train's table, or of each
    teacher of its `--compare-teachers` table (teacher, steps/s, samples/s, peak, TFLOP/step)."""
    labels: list[str] = []
    rows = []
    rss = " (the process's RSS)" if "peak RSS" in output else ""
    for line in output.splitlines():
        if teacher := _TEACHER_ROW.match(line):
            name, steps, samples, peak, tflop = teacher.groups()
            result = (
                f"{float(steps):.2f} steps/s, {float(samples):.1f} samples/s, peak {peak} GiB"
                f"{rss}, {tflop} TFLOP/step at the config's sizes"
            )
            rows.append(Row("train", OK, f"{name} teacher", result))
            continue
        if "steps/s" in line and "case" in line:
            labels = _TRAIN_LABELS.findall(line.split("BxTxHxW", 1)[-1])
            continue
        match = _TRAIN_ROW.match(line)
        if not match or not labels:
            continue
        case, device, batch, frames, height, width, rest = match.groups()
        values = dict(zip(labels, rest.split(), strict=False))
        if "steps/s" not in values:
            continue
        steps = float(values["steps/s"])
        result = f"{steps:.2f} steps/s, {steps * int(batch):.1f} samples/s"
        if "peak GiB" in values:
            rss = " (the process's RSS)" if device == "cpu" else ""
            result += f", peak {values['peak GiB']} GiB{rss}"
        item = f"{case.strip()} b{batch} t{frames} {height}x{width}"
        rows.append(Row("train", OK, item, result))
    return rows


def parse_estimate(teacher: str) -> Callable[[str], list[Row]]:
    def parse(output: str) -> list[Row]:
        match = re.search(r"estimated peak: (\d+) bytes", output)
        if not match:
            return []
        estimate = f"{human_bytes(int(match[1]))} peak (compare: the train rows' measured peak)"
        return [Row("memory", OK, f"{teacher} teacher: estimate (apps/doctor)", estimate)]

    return parse


# ----------------------------------------------------------------------------------------------
# The steps


def kernel_tests(*options: str) -> list[str]:
    cases = str(ROOT / "packages/kernels/tests/triton_kernel_cases.py")
    return [sys.executable, "-m", "pytest", cases, "-q", "-p", "no:cacheprovider", *options]


def gpu_steps() -> list[Step]:
    # The implementations a GPU can pick (eager is the CPU's): the work its 75 s were sized for.
    rope = (
        "--device cuda --shapes 32,768,16,64;32,1024,12,64 --dtypes bf16,fp32 "
        "--impls torch,compiled,triton"
    )
    backbone = (
        "--device cuda --preset ttt3r_512 --size 384x512 --dtype bf16 --lengths 16 64 256 "
        "--rules ttt3r"
    )
    heads = (
        "--device cuda --preset ttt3r_512 --size 384x512 --dtype bf16 --lengths 16 "
        "--warmup 2 --compare-heads --repeats 2"  # 108 frames: fits 45 s with the model's build
    )
    train = "--config ytvis2021 --device cuda --steps 5 --warmup 2 --compare-teachers"
    return [
        Step(
            "kernels",
            kernel_tests("-n", "4"),
            60,
            parse_pytest("kernels", "triton_kernel_cases.py on the GPU"),
        ),
        Step("rope2d", app("bench-rope2d", *rope.split()), 75, parse_rope2d),
        Step("backbone", app("bench-backbone", *backbone.split()), 120, parse_backbone),
        Step("heads", app("bench-backbone", *heads.split()), 45, parse_heads),
        Step("train", app("bench-train", *train.split(), *TRAIN_SETTING), 120, parse_train),
    ]


def tiny_steps() -> list[Step]:
    """The same steps on the CPU at tiny sizes (Triton under its interpreter), one thread each
    (steadier on a busy machine); bench-train's --compare-teachers shrinks ytvis2021 itself."""
    rope = "--device cpu --shapes 2,64,2,16 --dtypes fp32 --impls torch --reps 2 --warmup 1"
    backbone = "--device cpu --preset tiny --size 32x32 --lengths 2 4 --rules ttt3r --warmup 1"
    heads = "--device cpu --preset tiny --size 32x32 --lengths 2 --warmup 1 --compare-heads"
    train = "--config ytvis2021 --device cpu --steps 2 --warmup 1 --threads 1 --compare-teachers"
    return [
        Step(
            "kernels",
            kernel_tests("-k", "float32"),
            240,
            parse_pytest("kernels", "triton_kernel_cases.py, interpreter, fp32 cases"),
            env={"TRITON_INTERPRET": "1"},
        ),
        Step("rope2d", app("bench-rope2d", *rope.split(), "--threads", "1"), 240, parse_rope2d),
        Step(
            "backbone",
            app("bench-backbone", *backbone.split(), "--threads", "1"),
            240,
            parse_backbone,
        ),
        Step("heads", app("bench-backbone", *heads.split(), "--threads", "1"), 240, parse_heads),
        Step("train", app("bench-train", *train.split(), *TRAIN_SETTING), 300, parse_train),
    ]


def estimate_steps(tiny: bool) -> list[Step]:
    """apps/doctor's memory estimate of the train step, for both teachers, computed on the CPU
    (at bench-train's CPU sizes in the tiny form)."""
    sizes = list(CPU_TINY) if tiny else []
    steps = []
    for label, name in (("online", "ttt3r"), ("cached", "cached")):
        setting = ["ytvis2021", *TRAIN_SETTING, *sizes, f"model.teacher.name={name}"]
        command = [sys.executable, "-m", "post3r_train.memory_estimate", *setting]
        steps.append(Step("memory", command, 300 if tiny else 120, parse_estimate(label)))
    return steps


# ----------------------------------------------------------------------------------------------
# Running


def start(step: Step, scale: float) -> tuple[subprocess.Popen, float, float]:
    env = {**os.environ, **step.env}
    process = subprocess.Popen(
        step.command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a time-out ends its children too
    )
    return process, time.monotonic(), step.timeout_s * scale


def finish(step: Step, process: subprocess.Popen, started: float, limit: float) -> Outcome:
    try:
        output, _ = process.communicate(timeout=max(1.0, limit - (time.monotonic() - started)))
        code = process.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        code = None
    return Outcome(step, code, output, time.monotonic() - started)


def rows_of(outcome: Outcome) -> list[Row]:
    """The step's rows; a failed or timed-out step keeps its figures and gains a status row."""
    step = outcome.step
    rows = step.parse(outcome.output)
    if outcome.returncode is None:
        last = f"killed after {step.timeout_s:.0f} s (x scale)"
        return [*rows, Row(step.name, TIMEOUT, "time limit", last)]
    if outcome.returncode != 0:
        tail = [line for line in outcome.output.strip().splitlines() if line.strip()][-1:]
        message = f"exit {outcome.returncode}: {tail[0].strip()[:100] if tail else ''}"
        return [*rows, Row(step.name, FAILED, "exit status", message)]
    if not rows:
        return [Row(step.name, FAILED, "output", "no figures found in its output")]
    return rows


def run_steps(steps: Sequence[Step], background: Sequence[Step], scale: float) -> list[Outcome]:
    """Run `steps` one after the other, the `background` steps (CPU only) alongside them."""
    pending = [(step, start(step, scale)) for step in background]
    outcomes = []
    for step in steps:
        print(f"\n=== {step.name}: {' '.join(step.command[1:])}", flush=True)
        outcome = finish(step, *start(step, scale))
        print(outcome.output.rstrip(), flush=True)
        outcomes.append(outcome)
    for step, started in pending:
        outcome = finish(step, *started)
        print(f"\n=== {step.name}: {' '.join(step.command[1:])}")
        print(outcome.output.rstrip(), flush=True)
        outcomes.append(outcome)
    return outcomes


def format_table(title: str, outcomes: Sequence[Outcome]) -> str:
    """The summary: every step's rows, in the order the steps ran."""
    header = f"{'step':<9} {'status':<7} {'s':>5}  {'item':<48} result"
    lines = [title, header, "-" * len(header)]
    for outcome in outcomes:
        for row in rows_of(outcome):
            lines.append(
                f"{row.step:<9} {row.status:<7} {outcome.seconds:>5.0f}  {row.item:<48} "
                f"{row.result}"
            )
    return "\n".join(lines)


def describe_machine(tiny: bool) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    if tiny or not torch.cuda.is_available():
        device = f"CPU ({os.cpu_count()} cores), tiny sizes"
    else:
        device = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return f"GPU check summary: {device}; torch {torch.__version__}; {when}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/gpu-check.sh",
        description="Kernel tests, bench-rope2d, bench-backbone and bench-train on the GPU, "
        "with one summary table; exit status 1 when a step failed.",
    )
    parser.add_argument(
        "--cpu-tiny", action="store_true", help="the same steps on the CPU at tiny sizes (CI)"
    )
    parser.add_argument(
        "--timeout-scale",
        type=float,
        default=1.0,
        help="multiply every step's time limit (e.g. 2 for a slower GPU)",
    )
    args = parser.parse_args(argv)
    if not args.cpu_tiny and not torch.cuda.is_available():
        parser.error("no CUDA or ROCm device is visible to torch; --cpu-tiny runs the CPU form")
    if args.timeout_scale <= 0:
        parser.error("--timeout-scale must be > 0")
    steps = tiny_steps() if args.cpu_tiny else gpu_steps()
    outcomes = run_steps(steps, estimate_steps(args.cpu_tiny), args.timeout_scale)
    print()
    print(format_table(describe_machine(args.cpu_tiny), outcomes))
    failed = any(row.status in (FAILED, TIMEOUT) for o in outcomes for row in rows_of(o))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
