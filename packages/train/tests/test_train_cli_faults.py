"""`apps/train` under faults: Ctrl+C checkpoints, a failed or concurrent --continue changes
nothing, OS errors are one line."""

import hashlib
import os
import shutil
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_model_runs import run_cli, smoke_run

from post3r_train.engine.runlock import RunLock
from post3r_train.model import POST3RModel


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "/"
        for p in sorted(root.rglob("*"))
    }


def copy_of_smoke_run(tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(smoke_run().run_dir, copy)
    return copy


def test_ctrl_c_checkpoints_and_exits_130_with_one_line(tmp_path, monkeypatch):
    data = str(smoke_run().data)  # made before the model is patched
    calls = {"n": 0}
    original = POST3RModel.losses

    def interrupted_at_second_step(self, out):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, out)

    monkeypatch.setattr(POST3RModel, "losses", interrupted_at_second_step)
    code, out, err = run_cli(["smoke", "--data-dir", data, "--log-dir", str(tmp_path), "-q"])
    assert code == 130, err
    assert "Traceback" not in err
    (run_dir,) = (tmp_path / "smoke").iterdir()
    assert f"interrupted (Ctrl+C): --continue {run_dir} resumes" in err
    assert (run_dir / "results" / "checkpoints" / "step=000002.ckpt").is_file()
    assert "finished at step 2 (signal SIGINT)" in out


def test_a_continue_that_does_not_fit_leaves_the_run_as_it_was(tmp_path):
    run = copy_of_smoke_run(tmp_path)
    before = snapshot(run)
    code, _, err = run_cli(["--continue", str(run), "-q", "model.slot_dim=24"])
    assert code == 1 and "does not fit this model" in err
    assert snapshot(run) == before


def test_a_continue_of_a_run_held_by_another_job_is_refused(tmp_path):
    run = copy_of_smoke_run(tmp_path)
    before = snapshot(run)
    with RunLock.acquire(run):
        code, _, err = run_cli(["--continue", str(run), "-q", "trainer.max_steps=6"])
    assert code == 1
    assert f"{run} is in use by another job (pid {os.getpid()}, host" in err
    assert snapshot(run) == before


def test_a_read_only_log_directory_is_one_line(tmp_path):
    if os.geteuid() == 0:
        read_only = Path("/proc/post3r-cannot-write-here")  # root ignores permission bits
    else:
        read_only = tmp_path / "read-only"
        read_only.mkdir(mode=0o555)
    data = str(smoke_run().data)
    code, _, err = run_cli(["smoke", "--data-dir", data, "--log-dir", str(read_only), "-q"])
    assert code == 1
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: {read_only}") and "check the path and its permissions" in last


def test_train_uses_a_dataset_made_by_apps_synth_as_it_is(tmp_path):
    from omegaconf import OmegaConf

    from post3r_data.synth_cli import main as synth_main

    data = tmp_path / "synth"
    synth = ["--output", str(data), "--videos", "4", "--val-videos", "2", "--size", "32"]
    assert synth_main([*synth, "--frames", "4", "--videos-per-shard", "2", "--workers", "1"]) == 0
    logs = tmp_path / "logs"
    code, _, err = run_cli(["smoke", "--data-dir", str(data), "--log-dir", str(logs), "-q"])
    assert code == 0, err
    (run_dir,) = (logs / "smoke").iterdir()
    saved = OmegaConf.load(run_dir / "config.yaml").dataset.synthetic
    assert (saved.num_frames, saved.num_train_videos, saved.min_objects) == (4, 4, 3)
    code, _, err = run_cli(
        ["smoke", "--data-dir", str(data), "-q", "--dry", "dataset.synthetic.num_frames=3"]
    )
    assert code == 2 and "num_frames=3 (dataset: 4)" in err


def test_bench_train_rejects_zero_steps_and_bad_overrides():
    from train_model_runs import call

    from post3r_train.bench_train import main as bench_main

    code, _, err = call(bench_main, ["--steps", "0"])
    assert code == 2 and "--steps: must be a whole number >= 1, got 0" in err
    code, _, err = call(bench_main, ["--config", "smoke", "--device", "cpu", "model.nmu_slots=3"])
    assert code == 2 and "Traceback" not in err and "nmu_slots" in err
