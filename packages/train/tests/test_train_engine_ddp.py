"""Two-process DDP on CPU (gloo), launched the way `trainer.devices=2` launches it."""

from __future__ import annotations

import csv
import signal
import sys
from pathlib import Path

import pytest

from post3r_train.engine import evaluate_checkpoint, launch_local, read_checkpoint, seed_everything

sys.path.insert(0, str(Path(__file__).parent))
import train_engine_toy as toy


@pytest.mark.slow  # spawns processes that import torch
def test_ddp_preempt_resume_sync_metrics_and_one_checkpoint_set(tmp_path: Path, capfd) -> None:
    # Rank 1 alone gets SIGTERM during step 2; both ranks must stop after step 2 with one
    # checkpoint, then continue from it. In that continuation rank 1 SIGTERMs the launcher (this
    # process) during step 4, as a scheduler would: the launcher forwards it, every rank stops
    # after step 4 with a checkpoint, and a third continuation runs to step 6. Validation has 5
    # videos: 3 on rank 0, 2 on rank 1.
    argv = ["--log-dir", str(tmp_path), "--max-steps", "6", "--checkpoint-every", "100"]
    argv += ["--sigterm-at", "2", "--launcher-sigterm-at", "2", "--resume-after-stop"]
    argv += ["--val-size", "5"]
    # The launcher reports the signal it got (128 + SIGTERM), after the workers have finished.
    assert launch_local(2, argv, script=toy.__file__) == 128 + signal.SIGTERM
    output = capfd.readouterr().out
    assert "rank 1 stopped at step 2: signal SIGTERM" in output
    assert "rank 0 stopped at step 2: stop requested by another rank" in output
    assert "rank 0 stopped at step 4: signal SIGTERM" in output  # forwarded by the launcher
    assert "rank 1 stopped at step 4: signal SIGTERM" in output
    assert "rank 0 stopped at step 6: max_steps" in output
    assert "rank 1 stopped at step 6: max_steps" in output

    (root,) = (tmp_path / "toy").iterdir()  # one run directory, written by rank 0 only
    checkpoints = root / "results" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step=000006.ckpt"]
    saved = read_checkpoint(checkpoints / "last.ckpt")
    assert saved["world_size"] == 2 and len(saved["rng"]) == 2
    assert len(saved["metrics"]["states"]) == 2

    with open(root / "logs" / "metrics" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    assert [int(r["step"]) for r in rows if r["train/loss"]] == [1, 2, 3, 4, 5, 6]
    validations = [r for r in rows if r.get("val/mse")]
    assert [int(r["step"]) for r in validations] == [3, 6]
    assert all(float(r["val/count"]) == 5 for r in validations)  # none dropped, none twice

    # The metrics DDP logged equal a single-process evaluation of the same checkpoint.
    seed_everything(0)
    single = evaluate_checkpoint(toy.ToyModule(), toy.val_stream(0, 1, 5), checkpoint=root)
    assert single["val/count"] == 5
    assert single["val/mse"] == pytest.approx(float(validations[-1]["val/mse"]), rel=1e-6)
