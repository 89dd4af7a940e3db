"""apps/evaluate and apps/bench-train on the smoke run (apps/infer: test_train_infer.py)."""

import json
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent))
from train_model_runs import call, smoke_run

from post3r_train import bench_train, evaluate


def test_evaluate_prints_a_table_and_writes_json(tmp_path):
    run = smoke_run()
    output = tmp_path / "metrics.json"
    code, out, err = call(evaluate.main, [str(run.run_dir), "--output", str(output)])
    assert code == 0, err
    report = json.loads(output.read_text())
    metrics = report["metrics"]
    assert report["checkpoint"].endswith("last.ckpt")
    for name in ("ari", "mbo", "image_ari", "pointmap_ari", "object_point_error"):
        assert f"val/{name}" in metrics
        assert f"{name} " in out
    # The same checkpoint gives the same figures as the run's own last validation.
    import csv

    with open(run.run_dir / "logs" / "metrics" / "metrics.csv") as handle:
        last = [r for r in csv.DictReader(handle) if r["val/ari"]][-1]
    assert metrics["val/ari"] == pytest.approx(float(last["val/ari"]), abs=1e-6)


def test_evaluate_visualize_writes_visuals_of_a_run_trained_without_them(tmp_path):
    from post3r_train.config import load_config

    run = smoke_run()
    config = tmp_path / "config.yaml"
    quiet = load_config(run.run_dir / "config.yaml", ["model.visualize=false"])
    config.write_text(OmegaConf.to_yaml(quiet))
    visuals = tmp_path / "visuals"
    arguments = [str(run.run_dir), "--config", str(config), "--output", str(tmp_path / "m.json")]
    code, _, err = call(evaluate.main, [*arguments, "--visualize", str(visuals)])
    assert code == 0, err
    assert (visuals / "masks.png").is_file() and (visuals / "masks.gif").is_file()


def test_evaluate_a_missing_checkpoint_is_a_clear_error(tmp_path):
    code, _, err = call(evaluate.main, [str(tmp_path / "nothing")])
    assert code == 1 and "nothing" in err


def test_bench_train_prints_a_table(monkeypatch):
    policies: list[str] = []  # the timed step runs as the trainer's: freed memory kept on a CPU
    monkeypatch.setattr(bench_train, "keep_freed_memory_for", lambda d: policies.append(str(d)))
    code, out, err = call(
        bench_train.main, ["--config", "smoke", "--device", "cpu", "--steps", "1", "--warmup", "0"]
    )
    assert code == 0, err
    assert policies == ["cpu"]
    header, _, row = out.strip().splitlines()[1:4]
    assert "steps/s" in header and "peak" in header
    assert row.startswith("smoke") and float(row.split()[-5]) > 0
