"""End to end through the real CLI: `apps/train smoke trainer.devices=2` (two gloo processes)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from post3r_train.engine import evaluate_checkpoint, read_checkpoint
from post3r_train.engine.module import frozen_names

# Metrics that do not depend on how videos are grouped into batches. The contrastive loss
# does (its negatives are the other slots of the batch, gathered over ranks), so a sharded
# evaluation legitimately differs from a single-process one there.
SHARD_INVARIANT = ("ari", "image_ari", "mbo", "loss_feature", "loss_pointmap", "point_error")


@pytest.mark.slow  # spawns processes that import torch
def test_cli_ddp_run_matches_a_single_process_evaluation(tmp_path: Path) -> None:
    from post3r_train.cli import main
    from post3r_train.config import load_config
    from post3r_train.data import build_val_loader, prepare_data
    from post3r_train.model import POST3RModel

    data, logs = tmp_path / "data", tmp_path / "logs"
    overrides = ["trainer.devices=2", "dataset.val_batch_size=1"]
    assert main(["smoke", *overrides, "--data-dir", str(data), "--log-dir", str(logs)]) == 0

    (run,) = (logs / "smoke").iterdir()  # one run directory: only rank 0 wrote
    checkpoints = run / "results" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step=000004.ckpt"]
    with open(run / "logs" / "metrics" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    assert [int(r["step"]) for r in rows if r["train/loss"]] == [1, 2, 3, 4]
    logged = [r for r in rows if r.get("val/ari")][-1]

    cfg = load_config("smoke", [f"dataset.root={data}", "dataset.val_batch_size=1"])
    torch.manual_seed(cfg.seed)
    model = POST3RModel.from_config(cfg)
    saved = read_checkpoint(checkpoints / "last.ckpt")
    assert saved["world_size"] == 2
    assert set(saved["model"]) == set(model.trainable_state_dict())
    assert not set(saved["model"]) & frozen_names(model)  # no frozen weights saved

    single = evaluate_checkpoint(model, build_val_loader(cfg, prepare_data(cfg)), checkpoint=run)
    for name in SHARD_INVARIANT:
        assert single[f"val/{name}"] == pytest.approx(float(logged[f"val/{name}"]), rel=1e-3)
