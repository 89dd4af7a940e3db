"""apps/evaluate's report: 3D metrics with baselines on the smoke run, counts, valid JSON, a clear
error when nothing was evaluated, and no data generated where it was pointed."""

import io
import json
import math
import os
import shutil
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_model_runs import call, smoke_run

from post3r_train import evaluate


def _strict_json(text: str) -> dict:
    def refuse(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_evaluate_reports_3d_metrics_baselines_and_counts(tmp_path):
    run = smoke_run()
    output = tmp_path / "report.json"
    code, out, err = call(evaluate.main, [str(run.run_dir), "--output", str(output)])
    assert code == 0, err
    report = _strict_json(output.read_text())
    counts, metrics = report["counts"], report["metrics"]
    assert counts["num_samples"] == 2 and counts["data_skipped"] == 0  # smoke: 2 val videos
    assert counts["obj3d_num_videos"] == 2 and counts["obj3d_num_objects"] >= 4
    assert counts["camera_num_videos"] == 2
    for prefix in ("", "baseline_composite_", "baseline_plane_"):
        for name in ("obj3d_chamfer", "depth_abs_rel_scale", "depth_delta125_scale_shift"):
            value = metrics[f"val/{prefix}{name}"]
            assert value is not None and math.isfinite(value)
    # The dataset teacher's poses are the ground truth: camera errors vanish.
    assert metrics["val/camera_ate"] < 1e-5 and metrics["val/camera_rpe_rot"] < 1e-3
    assert "3D, same videos" in out and "object Chamfer" in out and "evaluated 2 videos" in out
    assert set(report["protocol_3d"]) >= {"obj3d", "depth", "camera"}


def test_evaluate_into_an_unwritable_place_is_one_line(tmp_path):
    if os.geteuid() == 0:
        output = Path("/proc/post3r-cannot-write-here/report.json")  # root ignores permissions
    else:
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o555)
        output = folder / "report.json"
    code, out, err = call(evaluate.main, [str(smoke_run().run_dir), "--output", str(output)])
    assert code == 1 and "Traceback" not in err
    assert "evaluated 2 videos" in out  # the table was printed before the write failed
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "check the path and its permissions" in last


def test_evaluate_never_generates_data_for_a_missing_folder(tmp_path):
    run = smoke_run()
    typo = tmp_path / "typo"
    code, _, err = call(evaluate.main, [str(run.run_dir), "--data-dir", str(typo)])
    assert code == 1 and not typo.exists()
    assert "does not exist" in err and "apps/synth" in err and "Traceback" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = call(evaluate.main, [str(run.run_dir), "--data-dir", str(empty)])
    assert code == 1 and "no synthetic-validation" in err
    assert list(empty.iterdir()) == []


def _corrupt_every_sample(shard: Path) -> None:
    """Keep the tar readable but make every member's content garbage."""
    with tarfile.open(shard) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive.getmembers() if m.isfile()]
    with tarfile.open(shard, "w") as archive:
        for member, content in members:
            garbage = b"garbage" * (len(content) // 7 + 1)
            member.size = len(garbage)
            archive.addfile(member, io.BytesIO(garbage))


def test_evaluate_fails_clearly_when_nothing_was_evaluated(tmp_path):
    run = smoke_run()
    data = tmp_path / "data"
    shutil.copytree(run.data, data)
    for shard in data.glob("synthetic-validation-*.tar"):
        _corrupt_every_sample(shard)
    output = tmp_path / "report.json"
    with pytest.warns(UserWarning, match="skipping unreadable data"):
        code, _, err = call(
            evaluate.main, [str(run.run_dir), "--data-dir", str(data), "--output", str(output)]
        )
    assert code == 1 and "nothing was evaluated" in err and str(data) in err
    assert not output.exists()


def test_report_writes_null_with_a_reason_for_metrics_that_counted_nothing():
    values = {
        "val/num_samples": 3.0,
        "val/data_skipped": 1.0,
        "val/ari": math.nan,
        "val/loss_total": 0.5,
        "val/obj3d_chamfer": math.nan,
        "val/obj3d_num_videos": 0.0,
    }
    report = evaluate.build_report(
        values, checkpoint=Path("x.ckpt"), dataset="ytvis", data_dir=Path("d")
    )
    assert report["counts"] == {"num_samples": 3, "data_skipped": 1, "obj3d_num_videos": 0}
    assert report["metrics"]["val/ari"] is None and report["metrics"]["val/loss_total"] == 0.5
    assert "foreground" in report["unavailable"]["val/ari"]
    assert "ground-truth geometry" in report["unavailable"]["val/obj3d_chamfer"]
    _strict_json(json.dumps(report, allow_nan=False))
    with pytest.raises(evaluate.NothingEvaluatedError, match="nothing was evaluated"):
        evaluate.build_report(
            {"val/num_samples": 0.0, "val/ari": math.nan},
            checkpoint=Path("x.ckpt"),
            dataset="synthetic",
            data_dir=Path("d"),
        )
