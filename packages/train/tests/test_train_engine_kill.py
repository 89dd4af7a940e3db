"""SIGKILL at a random step: `last.ckpt` survives and the resumed run equals an unbroken one."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from post3r_train.engine import fit, read_checkpoint, seed_everything

sys.path.insert(0, str(Path(__file__).parent))
import train_engine_toy as toy


def losses(run_dir: Path) -> list[tuple[int, str]]:
    with open(run_dir / "logs" / "metrics" / "metrics.csv") as file:
        return [(int(r["step"]), r["train/loss"]) for r in csv.DictReader(file) if r["train/loss"]]


def train(log_dir: Path | None, resume: Path | None = None):
    seed_everything(0)
    return fit(
        toy.ToyModule(),
        toy.train_stream(0, 1, 4),
        toy.val_stream(0, 1, 5),
        trainer=toy.small_trainer(max_steps=8),
        optim=toy.small_optim(),
        log_dir=log_dir,
        experiment="toy",
        resume=resume,
    )


def wait_for_step(run_parent: Path, step: int, process: subprocess.Popen, timeout: float) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = (run_parent.parents[1] / "stderr.txt").read_text()[-2000:]
            raise AssertionError(f"the run ended before it could be killed:\n{log}")
        for csv_path in run_parent.glob("*/logs/metrics/metrics.csv"):
            if any(s >= step for s, _ in losses(csv_path.parents[2])):
                return csv_path.parents[2]
        time.sleep(0.02)
    raise TimeoutError(f"no step {step} within {timeout} s")


@pytest.mark.slow  # spawns processes that import torch
def test_sigkill_then_continue_matches_the_unbroken_run(tmp_path: Path) -> None:
    kill_after = random.randint(3, 6)  # checkpoints every 2 steps: resume from 2, 4 or 6
    command = [sys.executable, toy.__file__, "--log-dir", str(tmp_path / "killed")]
    command += ["--max-steps", "8", "--step-sleep", "0.5"]  # >= 1 s of slack before the end
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "wb") as stderr:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        run_dir = wait_for_step(tmp_path / "killed" / "toy", kill_after, process, timeout=180)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    # The run may have gone past `kill_after` before the kill landed (a busy machine): judge the
    # checkpoint against the last step it logged, not against the step we waited for.
    reached = max(step for step, _ in losses(run_dir))
    assert kill_after <= reached < 8, "the kill must land mid-training"
    last = run_dir / "results" / "checkpoints" / "last.ckpt"
    stopped_at = read_checkpoint(last)["step"]  # intact, whatever the kill interrupted
    # Checkpoints every 2 steps, each written after its step's log row.
    assert 2 <= stopped_at <= reached and stopped_at >= reached - 2

    resumed = train(None, resume=run_dir)
    reference = train(tmp_path / "reference")
    assert resumed.step == 8 and resumed.run_dir == run_dir
    assert losses(run_dir) == losses(reference.run_dir), f"killed after step {kill_after}"
    assert resumed.val_metrics == reference.val_metrics
