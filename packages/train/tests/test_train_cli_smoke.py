"""`apps/train` end to end on tiny synthetic shards: run directory, metrics, visualisations,
checkpoints without frozen weights, resume, dry runs and bad input."""

import csv
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_model_runs import TINY_TTT3R, TINY_VIT, run_cli, smoke_run

from post3r_train.config import load_config
from post3r_train.model import POST3RModel


def run_on_smoke_data(log_dir: Path, *overrides: str) -> tuple[int, str, str]:
    """apps/train smoke on the shared smoke shards, logging under `log_dir`, quietly."""
    data = str(smoke_run().data)
    return run_cli(["smoke", "--data-dir", data, "--log-dir", str(log_dir), "-q", *overrides])


def metrics_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "logs" / "metrics" / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_smoke_run_writes_the_documented_run_directory():
    run = smoke_run()
    root = run.run_dir
    assert (root / "config.yaml").is_file()
    assert (root / "logs" / "tensorboard").is_dir()
    assert (root / "results" / "checkpoints" / "last.ckpt").is_file()
    assert (root / "results" / "checkpoints" / "step=000004.ckpt").is_file()
    saved = load_config(root / "config.yaml")
    assert saved.dataset.root == str(run.data)
    assert saved.trainer.max_steps == 4
    assert "validation: ari" in run.stdout and f"run directory: {root}" in run.stdout


def test_smoke_run_logs_every_loss_term_and_both_decoders_metrics():
    rows = metrics_rows(smoke_run().run_dir)
    columns = set(rows[0])
    assert {"train/feature", "train/pointmap", "train/contrastive"} <= columns
    for name in ("ari", "image_ari", "mbo", "image_mbo"):
        assert {f"val/{name}", f"val/pointmap_{name}"} <= columns
    assert {"val/object_point_error", "val/point_error"} <= columns
    final = [r for r in rows if r["val/ari"]][-1]
    assert -1.0 <= float(final["val/ari"]) <= 1.0
    assert 0.0 <= float(final["val/pointmap_mbo"]) <= 1.0


def test_smoke_run_writes_mask_images_animations_and_point_clouds():
    from post3r_train.visualize import read_ply

    folders = sorted((smoke_run().run_dir / "visualizations").iterdir())
    assert [f.name for f in folders] == ["step=000002", "step=000004"]
    last = folders[-1]
    assert (last / "masks.png").stat().st_size > 0
    from PIL import Image

    with Image.open(last / "masks.gif") as gif:
        assert gif.n_frames == 3  # one per validation frame
    points, colors = read_ply(last / "video0_slots.ply")
    assert points.shape[1] == 3 and len(points) == len(colors) > 0
    assert list(last.glob("video0_slot[0-9].ply"))
    # the first video in the infer layout, for apps/view and apps/render
    from post3r_train.infer_writer import read_manifest

    manifest = read_manifest(last / "video0")
    assert manifest["num_frames"] == 3 and manifest["has_points"]
    with Image.open(last / "masks.png") as still:  # labelled: header and label column
        assert still.width == 110 + 3 * 128  # 3 frames of 32 px drawn at 128 px


def test_frozen_teacher_and_encoder_never_reach_a_checkpoint(tmp_path):
    code, _, err = run_on_smoke_data(
        tmp_path, "trainer.max_steps=2", "trainer.val_check_interval=2", *TINY_TTT3R, *TINY_VIT
    )
    assert code == 0, err
    (run_dir,) = (tmp_path / "smoke").iterdir()
    saved = torch.load(run_dir / "results" / "checkpoints" / "last.ckpt", weights_only=True)
    keys = set(saved["model"])
    assert keys and not any(k.startswith(("teacher.", "encoder.")) for k in keys)
    model = POST3RModel.from_config(load_config(run_dir / "config.yaml"))
    assert keys == set(model.trainable_state_dict())
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & keys


def test_continue_resumes_the_run_and_keeps_validating(tmp_path):
    import shutil

    run = smoke_run()
    copy = tmp_path / "run"
    shutil.copytree(run.run_dir, copy)
    code, out, err = run_cli(["--continue", str(copy), "-q", "trainer.max_steps=6"])
    assert code == 0, err
    assert "finished at step 6" in out
    rows = metrics_rows(copy)
    assert [int(r["step"]) for r in rows if r["val/ari"]] == [2, 4, 6]
    assert (copy / "results" / "checkpoints" / "step=000006.ckpt").is_file()


def test_a_run_without_visuals_leaves_no_empty_visualization_folders(tmp_path):
    code, _, err = run_on_smoke_data(
        tmp_path, "trainer.max_steps=2", "trainer.val_check_interval=2", "model.visualize=false"
    )
    assert code == 0, err
    (run_dir,) = (tmp_path / "smoke").iterdir()
    assert list((run_dir / "visualizations").iterdir()) == []


def test_dry_run_does_one_step_and_writes_nothing(tmp_path):
    code, out, err = run_cli(
        ["smoke", "--dry", "--data-dir", str(smoke_run().data), "--log-dir", str(tmp_path)]
    )
    assert code == 0, err
    assert "dry run: loss" in out and "trainable" in out
    assert not any(tmp_path.iterdir())


def test_overrides_reach_the_saved_config(tmp_path):
    code, _, err = run_on_smoke_data(
        tmp_path, "trainer.max_steps=1", "model.num_slots=3", "experiment=renamed"
    )
    assert code == 0, err
    (run_dir,) = (tmp_path / "renamed").iterdir()
    assert load_config(run_dir / "config.yaml").model.num_slots == 3


def test_a_config_typo_is_rejected_with_a_suggestion(tmp_path):
    code, _, err = run_cli(["smoke", "model.num_slot=3", "--log-dir", str(tmp_path)])
    assert code == 2
    assert "did you mean model.num_slots" in err


YTVIS_SMOKE = ["smoke", "dataset.name=ytvis", "dataset.image_size=32"]


def test_missing_data_directory_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere"
    code, _, err = run_cli(
        [*YTVIS_SMOKE, "--data-dir", str(missing), "--log-dir", str(tmp_path / "runs")]
    )
    assert code == 1
    assert str(missing) in err and "does not exist" in err


def test_empty_data_directory_names_the_command_that_fills_it(tmp_path):
    code, _, err = run_cli(
        [*YTVIS_SMOKE, "--data-dir", str(tmp_path), "--log-dir", str(tmp_path / "runs")]
    )
    assert code == 1
    assert "no ytvis-train" in err and "prepare-ytvis" in err


def test_corrupt_shards_are_a_clear_error(tmp_path):
    for split in ("train", "validation"):
        (tmp_path / f"ytvis-{split}-000000.tar").write_bytes(b"not a tar file" * 10)
    code, _, err = run_cli(
        [*YTVIS_SMOKE, "--data-dir", str(tmp_path), "--log-dir", str(tmp_path / "runs")]
    )
    assert code == 1
    assert "ytvis-train-000000.tar" in err


def test_continue_from_a_missing_checkpoint_is_a_clear_error(tmp_path):
    data = tmp_path / "data"
    code, _, err = run_cli(
        [
            *("smoke", "--continue", str(tmp_path / "missing.ckpt")),
            *("--log-dir", str(tmp_path), "--data-dir", str(data)),
        ]
    )
    assert code == 1
    assert "missing.ckpt: no such run directory or checkpoint file" in err
    assert not data.exists()  # checked before any data is generated


def test_a_non_finite_loss_stops_with_an_error_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    smoke_run()  # the shared run is made before the model is patched (whatever ran first)
    calls = {"n": 0}
    original = POST3RModel.losses

    def failing(self, out):
        loss, parts = original(self, out)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 2 else loss), parts

    monkeypatch.setattr(POST3RModel, "losses", failing)
    code, _, err = run_on_smoke_data(
        tmp_path, "trainer.val_check_interval=100", "trainer.checkpoint_every_n_steps=1"
    )
    assert code == 1
    assert "finite" in err
    (run_dir,) = (tmp_path / "smoke").iterdir()
    checkpoints = run_dir / "results" / "checkpoints"
    assert (checkpoints / "step=000002.ckpt").is_file() or (checkpoints / "last.ckpt").is_file()
    payload = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in payload["model"].values())


def test_the_default_config_builds_and_takes_a_step(tmp_path):
    code, out, err = run_cli(
        [
            "--dry",
            "--data-dir",
            str(tmp_path / "data"),
            "dataset.synthetic.num_train_videos=2",
            "dataset.synthetic.num_val_videos=1",
            "dataset.synthetic.videos_per_shard=1",
            "dataset.batch_size=2",
        ]
    )
    assert code == 0, err
    assert "dry run: loss" in out
    assert sorted(p.name for p in (tmp_path / "data").glob("*.tar")) == [
        "synthetic-train-000000.tar",
        "synthetic-train-000001.tar",
        "synthetic-validation-000000.tar",
    ]


def test_an_interrupted_synthetic_generation_is_redone(tmp_path):
    from post3r_train.config import load_config
    from post3r_train.data import prepare_data

    overrides = [
        f"dataset.root={tmp_path}",
        "dataset.synthetic.num_train_videos=2",
        "dataset.synthetic.num_val_videos=1",
        "dataset.synthetic.videos_per_shard=1",
    ]
    cfg = load_config("smoke", overrides)
    prepare_data(cfg, progress=False)
    shard = tmp_path / "synthetic-train-000001.tar"
    content = shard.read_bytes()
    shard.unlink()  # as if the process had been killed before this shard was renamed
    info = tmp_path / "synthetic-info.json"
    info.write_text(info.read_text().replace('"complete": true', '"complete": false'))
    prepare_data(cfg, progress=False)
    assert shard.read_bytes() == content
