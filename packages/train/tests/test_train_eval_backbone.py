"""apps/eval-backbone on the smoke shards with the tiny random-weight backbone: both update
rules, valid JSON, and argument errors before any work."""

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_model_runs import call, smoke_run

from post3r_train import eval_backbone

TINY = ["--preset", "tiny", "--random-weights", "--image-size", "32", "--frames", "2"]


def test_eval_backbone_reports_both_update_rules(tmp_path):
    output = tmp_path / "backbone.json"
    argv = ["--data-dir", str(smoke_run().data), *TINY, "--videos", "1", "--output", str(output)]
    code, out, err = call(eval_backbone.main, argv)
    assert code == 0, err
    report = json.loads(output.read_text(), parse_constant=lambda c: 1 / 0)
    assert set(report["rules"]) == {"cut3r", "ttt3r"}
    for rule in report["rules"].values():
        metrics = rule["metrics"]
        assert metrics["depth_num_videos_scale"] == 1 and rule["frames"] == 2
        for name in ("depth_abs_rel_scale", "depth_delta125_scale_shift", "camera_ate"):
            assert math.isfinite(metrics[name])
        assert rule["frames_per_second"] > 0 and rule["peak_memory_mib"] > 0
    assert "frames/s" in out and "Protocol" in out and "Umeyama" in out


def test_eval_backbone_refuses_bad_arguments_before_any_work(tmp_path):
    code, _, err = call(eval_backbone.main, ["--data-dir", str(tmp_path / "typo"), *TINY])
    assert code == 1 and "does not exist" in err and not (tmp_path / "typo").exists()
    code, _, err = call(
        eval_backbone.main,
        ["--data-dir", str(tmp_path), "--random-weights", "--frames", "1", "--image-size", "30"],
    )
    assert code == 2 and "--frames must be >= 2" in err and "multiple of 16" in err
    code, _, err = call(
        eval_backbone.main, ["--data-dir", str(tmp_path), "--checkpoint", str(tmp_path / "x.pth")]
    )
    assert code == 2 and "x.pth does not exist" in err
