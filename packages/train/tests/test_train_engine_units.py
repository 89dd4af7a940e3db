"""Engine pieces on their own: schedule, config checks, checkpoint files, state dicts, logs."""

from __future__ import annotations

import errno
import math
import os
import random
import signal
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from post3r_train.engine import (
    CheckpointError,
    OptimConfig,
    RunDir,
    StateDictMismatchError,
    TrainerConfig,
    TrainModule,
    WandbSettings,
    find_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from post3r_train.engine.checkpoint import prune_checkpoints, publish_as, step_checkpoints
from post3r_train.engine.loggers import MetricsCSV, RunLogger, start_wandb
from post3r_train.engine.module import frozen_names
from post3r_train.engine.rng import capture_rng, restore_rng
from post3r_train.engine.schedule import lr_factor
from post3r_train.engine.trainer_config import parse_duration

sys.path.insert(0, str(Path(__file__).parent))
import train_engine_toy as toy


def test_exp_decay_schedule_matches_the_original_formula() -> None:
    optim = OptimConfig(warmup_steps=10, decay_steps=110)
    assert lr_factor(0, optim, 1000) == 0.0
    assert lr_factor(5, optim, 1000) == pytest.approx(0.5)
    assert lr_factor(10, optim, 1000) == pytest.approx(1.0)
    # exp(-5 p) with p = (step - warmup) / (decay - warmup), clipped at 1.
    assert lr_factor(60, optim, 1000) == pytest.approx(math.exp(-2.5))
    assert lr_factor(110, optim, 1000) == pytest.approx(math.exp(-5))
    assert lr_factor(500, optim, 1000) == pytest.approx(math.exp(-5))


def test_cosine_and_constant_schedules() -> None:
    cosine = OptimConfig(scheduler="warmup_cosine", warmup_steps=0, final_lr_factor=0.1)
    assert lr_factor(0, cosine, 100) == pytest.approx(1.0)
    assert lr_factor(50, cosine, 100) == pytest.approx(0.55)
    assert lr_factor(100, cosine, 100) == pytest.approx(0.1)
    constant = OptimConfig(scheduler="constant", warmup_steps=4)
    assert [lr_factor(s, constant, 100) for s in (2, 4, 99)] == [0.5, 1.0, 1.0]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"precision": "8"}, "trainer.precision='8' is not one of 32, 16, bf16"),
        ({"nan_policy": "ignore"}, "trainer.nan_policy='ignore'"),
        ({"accumulate_grad_batches": 0}, "trainer.accumulate_grad_batches must be >= 1"),
        ({"gradient_clip_val": 0.0}, "trainer.gradient_clip_val must be > 0"),
        ({"max_time": "1h"}, "trainer.max_time='1h' is not DD:HH:MM:SS"),
        ({"cpu_threads": 0}, "trainer.cpu_threads must be >= 1, or null"),
    ],
)
def test_trainer_config_rejects_bad_values_by_name(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainerConfig(**overrides).validate()


def test_precision_aliases_and_durations() -> None:
    assert TrainerConfig(precision="bf16-mixed").precision_mode == "bf16"
    assert TrainerConfig(precision="16-mixed").precision_mode == "16"
    assert parse_duration("01:02:03:04") == 86400 + 2 * 3600 + 3 * 60 + 4
    assert parse_duration("90") == 90
    with pytest.raises(ValueError, match="decay_steps"):
        OptimConfig(warmup_steps=10, decay_steps=5).validate()


def test_trainable_state_dict_leaves_frozen_weights_out() -> None:
    module = toy.ToyModule()
    keys = set(module.trainable_state_dict())
    assert keys == {f"head.{i}.{kind}" for i in (0, 1, 4) for kind in ("weight", "bias")}
    assert not any(key.startswith("backbone.") for key in keys)
    assert frozen_names(module) == {
        *(f"backbone.{i}.{kind}" for i in (0, 1) for kind in ("weight", "bias")),
        *(f"backbone.1.{b}" for b in ("running_mean", "running_var", "num_batches_tracked")),
    }

    class WithTrainableNorm(TrainModule):
        def __init__(self) -> None:
            super().__init__()
            self.frozen = nn.BatchNorm1d(3).requires_grad_(False)
            self.norm = nn.BatchNorm1d(3)

    keys = set(WithTrainableNorm().trainable_state_dict())
    assert {"norm.weight", "norm.running_mean", "norm.num_batches_tracked"} <= keys
    assert not any(key.startswith("frozen.") for key in keys)


def test_loading_a_mismatched_state_dict_lists_every_problem() -> None:
    module = toy.ToyModule()
    state = dict(module.trainable_state_dict())
    state.pop("head.0.bias")
    state["head.9.weight"] = torch.zeros(2)
    state["head.4.weight"] = torch.zeros(3, 3)
    with pytest.raises(StateDictMismatchError) as caught:
        module.load_trainable_state_dict(state, source="run/last.ckpt")
    text = str(caught.value)
    assert "run/last.ckpt does not fit this model" in text
    assert "1 missing key(s): head.0.bias" in text
    assert "1 unexpected key(s): head.9.weight" in text
    assert "head.4.weight: saved (3, 3), model (1, 16)" in text


def test_state_dict_round_trip_restores_weights() -> None:
    source, target = toy.ToyModule(), toy.ToyModule()
    with torch.no_grad():
        for p in source.head.parameters():
            p.add_(1.0)
    target.load_trainable_state_dict(source.trainable_state_dict())
    for a, b in zip(source.head.parameters(), target.head.parameters(), strict=True):
        assert torch.equal(a, b)


def test_checkpoint_round_trip_and_foreign_or_broken_files(tmp_path: Path) -> None:
    path = tmp_path / "step=000001.ckpt"
    save_checkpoint(path, {"step": 1, "model": {"w": torch.arange(3.0)}})
    loaded = read_checkpoint(path)
    assert loaded["step"] == 1 and torch.equal(loaded["model"]["w"], torch.arange(3.0))
    plain = tmp_path / "plain"
    plain.touch()  # atomic writes get the mode of an ordinary new file, not mkstemp's 0600
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777

    truncated = tmp_path / "last.ckpt"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"last\.ckpt cannot be read .*truncated or corrupt"):
        read_checkpoint(truncated)
    with pytest.raises(CheckpointError, match=r"step=000001\.ckpt"):  # names the alternative
        read_checkpoint(truncated)

    foreign = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a post3r training checkpoint"):
        read_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        read_checkpoint(tmp_path / "absent.ckpt")


def test_disk_full_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    path = tmp_path / "last.ckpt"
    save_checkpoint(path, {"step": 1})
    real_save = torch.save

    def save_until_disk_full(obj, file, *args, **kwargs):
        real_save(obj, file, *args, **kwargs)  # bytes reach the temporary file ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk fills up

    monkeypatch.setattr(torch, "save", save_until_disk_full)
    with pytest.raises(OSError) as caught:
        save_checkpoint(path, {"step": 2})
    assert caught.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert read_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary left


def test_publish_prune_and_find(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path, "exp")
    for step in (2, 4, 6):
        save_checkpoint(run.checkpoints / f"step={step:06d}.ckpt", {"step": step})
    publish_as(run.checkpoints / "step=000006.ckpt", run.checkpoints / "last.ckpt")
    prune_checkpoints(run.checkpoints, keep=-1)
    assert [s for s, _ in step_checkpoints(run.checkpoints)] == [2, 4, 6]
    prune_checkpoints(run.checkpoints, keep=2)
    assert [s for s, _ in step_checkpoints(run.checkpoints)] == [4, 6]
    prune_checkpoints(run.checkpoints, keep=1)
    assert [s for s, _ in step_checkpoints(run.checkpoints)] == [6]
    assert find_checkpoint(run.root) == run.checkpoints / "last.ckpt"
    (run.checkpoints / "last.ckpt").unlink()
    assert find_checkpoint(run.root) == run.checkpoints / "step=000006.ckpt"
    assert read_checkpoint(find_checkpoint(run.root))["step"] == 6
    empty = RunDir.create(tmp_path, "empty")
    with pytest.raises(CheckpointError, match="stopped before its first checkpoint"):
        find_checkpoint(empty.root)
    with pytest.raises(CheckpointError, match="no such run directory"):
        find_checkpoint(tmp_path / "nowhere")


def test_run_directories_are_unique_and_laid_out(tmp_path: Path) -> None:
    first, second = RunDir.create(tmp_path, "exp"), RunDir.create(tmp_path, "exp")
    assert first.root != second.root and first.root.parent == tmp_path / "exp"
    for folder in ("logs/metrics", "logs/tensorboard", "results/checkpoints", "visualizations"):
        assert (first.root / folder).is_dir()


def test_metrics_csv_widens_and_truncates_on_resume(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    csv = MetricsCSV(path)
    csv.write(1, {"train/loss": 1.5})
    csv.write(2, {"train/loss": 1.25, "val/mse": 0.5})
    csv.write(3, {"train/loss": float("nan")})
    assert path.read_text().splitlines() == [
        "step,train/loss,val/mse",
        "1,1.5,",
        "2,1.25,0.5",
        "3,nan,",
    ]
    MetricsCSV(path, keep_until_step=2)
    assert path.read_text().splitlines()[-1] == "2,1.25,0.5"


def test_rng_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(5)
    state = capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    save_checkpoint(tmp_path / "c.ckpt", {"rng": [state]})
    restore_rng(read_checkpoint(tmp_path / "c.ckpt")["rng"][0])
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_wandb_missing_gives_the_install_command(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(RuntimeError, match="uv sync --extra wandb"):
        start_wandb(RunDir.create(tmp_path, "exp"), WandbSettings(), {})


def fake_wandb(init) -> types.ModuleType:
    module = types.ModuleType("wandb")
    module.init = init
    module.util = types.SimpleNamespace(generate_id=lambda: "abc123")
    return module


def test_wandb_goes_offline_without_an_api_key_and_never_stops_training(
    tmp_path, monkeypatch
) -> None:
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(lambda **kw: calls.append(kw) or "run"))
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    run = RunDir.create(tmp_path, "exp")
    assert start_wandb(run, WandbSettings(), {"a": 1}) == "run"
    assert calls[-1]["mode"] == "offline"  # no key: no login prompt, no network
    assert calls[-1]["id"] == "abc123" and calls[-1]["config"] == {"a": 1}
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password secret\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # what `wandb login` writes
    start_wandb(run, WandbSettings(), {})
    assert calls[-1]["mode"] == "online" and calls[-1]["id"] == "abc123"  # same run resumed
    monkeypatch.setenv("WANDB_MODE", "disabled")
    start_wandb(run, WandbSettings(), {})
    assert calls[-1]["mode"] == "disabled"

    def unreachable(**kwargs):
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(unreachable))
    logger = RunLogger(run, tensorboard=False, wandb=WandbSettings())
    assert logger.wandb is None  # W&B failed to start; the CSV log still works
    logger.log(1, {"train/loss": 0.5})
    assert run.metrics_csv.read_text().splitlines() == ["step,train/loss", "1,0.5"]


def test_preemption_watch_records_sigusr1_and_restores_the_handler() -> None:
    from post3r_train.engine.signals import PreemptionWatch

    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionWatch() as watch:
        assert not watch.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watch.received == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_ranks_come_from_torchrun_or_a_multi_task_srun_step(monkeypatch) -> None:
    from post3r_train.engine.distributed import launched_world

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    assert launched_world() == (0, 0, 1)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # the batch script: one task
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert launched_world() == (0, 0, 1)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "16")  # srun, one task per GPU
    monkeypatch.setenv("SLURM_PROCID", "9")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert launched_world() == (9, 1, 16)
    monkeypatch.setenv("RANK", "3")  # torchrun's variables win (its workers inherit SLURM's)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launched_world() == (3, 3, 4)


def test_srun_without_master_addr_and_gpu_without_device_are_clear_errors(monkeypatch) -> None:
    from post3r_train.engine import init_distributed
    from post3r_train.engine.distributed import select_device

    slurm_step = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    slurm_step.update(SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="1", SLURM_LOCALID="1")
    slurm_step.pop("MASTER_ADDR", None)
    monkeypatch.setattr(os, "environ", slurm_step)  # a copy: nothing leaks into other tests
    with pytest.raises(RuntimeError, match=r"MASTER_ADDR is not set: under srun export it"):
        init_distributed("cpu")
    assert "RANK" not in slurm_step  # refused before touching the environment
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"trainer.accelerator=gpu but no CUDA/ROCm"):
            select_device("gpu", 0)
