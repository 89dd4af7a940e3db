"""`uv run apps/bench-train --seeds 0-4`: train once per seed as a user would, tabulate the results.

Each seed is a fresh `python -m post3r_train [CONFIG] seed=N ...` process (the same command line
as `uv run apps/train`, run by this interpreter) with its own empty data and log directories, so
the wall time includes interpreter start-up and the synthetic data generation of a fresh clone.
The final validation line the train command prints (`validation: ari 0.912, mbo 0.487, ...`) is
parsed; the markdown table has one row per seed, then the mean and the worst (lowest metric,
longest wall time), and names the machine.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from post3r_train.errors import ConfigError

COLUMNS = {"ari": "video FG-ARI", "mbo": "video mBO", "pointmap_ari": "pointmap video ARI"}
"""The validation metrics tabulated (names as the train command prints them) and their titles."""


@dataclass(frozen=True)
class SeedResult:
    """One seed's run: its metrics (None where the run printed none) and wall seconds."""

    seed: int
    metrics: dict[str, float] | None
    seconds: float
    error: str | None = None


def parse_seeds(text: str) -> list[int]:
    """`0-4` -> [0, 1, 2, 3, 4]; `1,3,7` and `2` work too; ranges and lists mix (`0-2,5`)."""
    seeds: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise ConfigError(f"--seeds {text!r}: expected seeds like 0-4, 1,3,7 or 0-2,5")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise ConfigError(f"--seeds {text!r}: the range {part.strip()} is empty")
        seeds += range(first, last + 1)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: a seed is listed twice")
    return seeds


def parse_validation(stdout: str) -> dict[str, float] | None:
    """The metrics of the last `validation: name value, ...` line of the train command."""
    lines = [line for line in stdout.splitlines() if line.startswith("validation: ")]
    if not lines:
        return None
    pairs = (item.rsplit(" ", 1) for item in lines[-1].removeprefix("validation: ").split(", "))
    return {name: float(value) for name, value in pairs}


def train_command(config: str | None, seed: int, overrides: Sequence[str], work: Path) -> list[str]:
    """The train command of one seed, with fresh data and log directories under `work`."""
    argv = [sys.executable, "-m", "post3r_train"]
    if config:
        argv.append(config)
    dirs = ["--data-dir", str(work / "data"), "--log-dir", str(work / "logs")]
    return [*argv, *dirs, "-q", f"seed={seed}", *overrides]


def run_seed(config: str | None, seed: int, overrides: Sequence[str], work: Path) -> SeedResult:
    """Train one seed in a fresh process; its progress and errors go to this stderr."""
    command = train_command(config, seed, overrides, work)
    print(f"seed {seed}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    started = time.monotonic()
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    seconds = time.monotonic() - started
    metrics = parse_validation(done.stdout)
    error = None
    if done.returncode != 0:
        error = f"exit code {done.returncode}"
    elif metrics is None:
        error = "no validation line (set trainer.val_check_interval <= trainer.max_steps)"
    return SeedResult(seed, metrics if error is None else None, seconds, error)


def machine() -> str:
    """The CPU model and core count (what the wall times depend on)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1] for line in handle if line.startswith("model name")]
        model = names[0].strip() if names else model
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores available"


def format_table(results: Sequence[SeedResult]) -> str:
    """Markdown: one row per seed, then mean and worst over the seeds that finished."""
    header = ["seed", *COLUMNS.values(), "wall time"]
    rows = [header, ["---"] + ["---:"] * (len(header) - 1)]
    for result in results:
        if result.metrics is None:
            rows.append([str(result.seed), *[f"failed: {result.error}"] * len(COLUMNS), ""])
            continue
        values = [_metric(result.metrics, name) for name in COLUMNS]
        rows.append([str(result.seed), *values, _minutes(result.seconds)])
    finished = [r for r in results if r.metrics is not None]
    if finished:
        for label, pick, time_pick in (("mean", _mean, _mean), ("worst", min, max)):
            values = []
            for name in COLUMNS:
                scores = [r.metrics[name] for r in finished if r.metrics and name in r.metrics]
                values.append(f"{pick(scores):.3f}" if scores else "-")
            seconds = time_pick([r.seconds for r in finished])
            rows.append([f"**{label}**", *values, _minutes(seconds)])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _metric(metrics: dict[str, float], name: str) -> str:
    return f"{metrics[name]:.3f}" if name in metrics else "-"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def seeds_table(
    seeds: Sequence[int],
    overrides: Sequence[str],
    config: str | None = None,
    keep: Path | None = None,
) -> int:
    """Train every seed, print the table; 0 if every seed finished. `keep`: the directory
    that keeps each seed's data and run (`<keep>/seed-N/`); default a temporary one, removed."""
    root = keep if keep is not None else Path(tempfile.mkdtemp(prefix="post3r-seeds-"))
    try:
        results = [run_seed(config, seed, overrides, root / f"seed-{seed}") for seed in seeds]
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    shown = " ".join([config or "default", *overrides])
    print(f"apps/train {shown}, seeds {', '.join(map(str, seeds))}; machine: {machine()}")
    print("wall time: the whole command, start-up and data generation included")
    print()
    print(format_table(results))
    failed = [r for r in results if r.metrics is None]
    for result in failed:
        print(f"error: seed {result.seed} failed: {result.error}", file=sys.stderr)
    return 1 if failed else 0
