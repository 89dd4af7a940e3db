"""`fit` in one process on the toy module: outputs, accumulation, faults, resume."""

from __future__ import annotations

import csv
import errno
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from post3r_train.engine import (
    CheckpointError,
    CheckpointWriteError,
    FitResult,
    NonFiniteLossError,
    StateDictMismatchError,
    evaluate_checkpoint,
    fit,
    read_checkpoint,
    seed_everything,
)

sys.path.insert(0, str(Path(__file__).parent))
import train_engine_toy as toy


def run(
    tmp_path: Path | None, make=toy.ToyModule, train=None, val_size: int = 5, **settings
) -> FitResult:
    """Fit `make()`; `settings` go to TrainerConfig, except `resume`, which goes to fit."""
    resume = settings.pop("resume", None)
    seed_everything(0)  # the frozen backbone is random: build it identically every time
    return fit(
        make(),
        train or toy.train_stream(0, 1, 4),
        toy.val_stream(0, 1, val_size) if val_size else None,
        trainer=toy.small_trainer(**settings),
        optim=toy.small_optim(),
        log_dir=tmp_path,
        experiment="toy",
        config={"note": "engine test"},
        resume=resume,
    )


def rows(result: FitResult) -> list[dict[str, str]]:
    with open(result.run_dir / "logs" / "metrics" / "metrics.csv") as file:
        return list(csv.DictReader(file))


def column(result: FitResult, name: str) -> list[tuple[int, str]]:
    return [(int(r["step"]), r[name]) for r in rows(result) if r.get(name)]


def test_fit_writes_logs_visuals_and_one_checkpoint_set(tmp_path: Path, capsys) -> None:
    result = run(tmp_path, progress_bar=True)
    root = result.run_dir
    assert result.step == 6 and result.stop_reason == "max_steps"
    bar = capsys.readouterr().err.split("\r")[-1]  # the progress bar's final state
    assert "train: 100%" in bar and "6/6" in bar and "step/s" in bar and "loss=" in bar
    assert root.parent == tmp_path / "toy"
    assert "engine test" in (root / "config.yaml").read_text()
    checkpoints = sorted(p.name for p in (root / "results" / "checkpoints").iterdir())
    assert checkpoints == ["last.ckpt", "step=000006.ckpt"]
    assert [s for s, _ in column(result, "train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in column(result, "val/mse")] == [3, 6]
    assert list((root / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert (root / "visualizations" / "step=000003" / "pred.png").is_file()

    saved = read_checkpoint(root / "results" / "checkpoints" / "last.ckpt")
    assert saved["step"] == 6 and saved["data_position"] == 6
    assert not any(key.startswith("backbone") for key in saved["model"])  # frozen: never saved
    assert set(saved["rng"][0]) == {"python", "numpy", "torch", "cuda", "data"}
    assert saved["metrics"]["values"] == result.val_metrics
    # The checkpoint, evaluated from scratch, gives the metrics the run logged.
    seed_everything(0)
    again = evaluate_checkpoint(toy.ToyModule(), toy.val_stream(0, 1, 5), checkpoint=root)
    assert again["val/mse"] == pytest.approx(result.val_metrics["val/mse"], rel=1e-6)
    assert again["val/count"] == 5


def test_cpu_threads_sets_the_torch_threads_of_a_cpu_run() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        run(None, max_steps=1, cpu_threads=1)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        run(None, max_steps=1)  # null: the process's setting stays
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_accumulation_equals_one_larger_batch_and_clipping_bounds_gradients() -> None:
    def trained(batch: int, accumulate: int, clip: float | None) -> toy.ToyModule:
        seed_everything(0)
        module = toy.ToyModule(dropout=0.0)
        fit(
            module,
            toy.train_stream(0, 1, batch),
            trainer=toy.small_trainer(
                max_steps=3, accumulate_grad_batches=accumulate, gradient_clip_val=clip
            ),
            optim=toy.small_optim(),
        )
        return module

    whole, accumulated = trained(4, 1, None), trained(2, 2, None)
    for a, b in zip(whole.head.parameters(), accumulated.head.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    clipped = trained(4, 1, 1e-3)  # the last step's gradients are still on the parameters
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in clipped.head.parameters()]))
    assert float(norm) == pytest.approx(1e-3, rel=1e-3)


def test_nan_skip_counts_and_goes_on(tmp_path: Path) -> None:
    poisoned = toy.train_stream(0, 1, 4, nan_batches=frozenset({2}))
    result = run(tmp_path, train=poisoned, nan_policy="skip")
    assert result.step == 6 and result.nan_skipped == 1
    losses = dict(column(result, "train/loss"))
    assert losses[3] == "nan" and all(np.isfinite(float(v)) for s, v in losses.items() if s != 3)
    assert dict(column(result, "train/nan_skipped"))[6] == "1.0"
    assert np.isfinite(result.val_metrics["val/mse"])


class NaNGradientAtCall2(toy.ToyModule):
    """A finite loss whose gradient is NaN on the second step (sqrt'(0) * 0)."""

    def training_step(self, batch: dict):
        loss, parts = super().training_step(batch)
        if self.calls == 2:
            loss = loss + (self.head[0].weight[0, 0] * 0).abs().sqrt()
        return loss, parts


def test_a_nan_gradient_behind_a_finite_loss_is_skipped_too(tmp_path: Path) -> None:
    result = run(tmp_path, make=NaNGradientAtCall2, nan_policy="skip", val_size=0)
    assert result.step == 6 and result.nan_skipped == 1
    losses = dict(column(result, "train/loss"))
    assert np.isfinite(float(losses[2]))  # the loss was fine: the gradient gave it away
    assert dict(column(result, "train/nan_skipped"))[2] == "1.0"
    assert dict(column(result, "train/grad_norm"))[2] == "nan"


def test_nan_stop_names_step_and_keys_and_keeps_the_good_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError) as caught:
        run(tmp_path, train=toy.train_stream(0, 1, 4, nan_batches=frozenset({4})))
    message = str(caught.value)
    assert "step 5" in message and "trainer.nan_policy=stop" in message
    assert "s00016, s00017, s00018, s00019" in message  # the samples of the bad batch
    assert "step=000004.ckpt" in message
    (root,) = (tmp_path / "toy").iterdir()
    assert read_checkpoint(root / "results" / "checkpoints" / "last.ckpt")["step"] == 4
    failure = (root / "logs" / "failure-rank0.txt").read_text()  # the run says why it failed
    assert "rank 0 failed after step 4" in failure and "NonFiniteLossError: step 5" in failure


def test_nan_skip_limit_stops_the_run(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError, match=r"more than trainer.max_nan_skips=1"):
        run(
            tmp_path,
            train=toy.train_stream(0, 1, 4, nan_batches=frozenset({1, 2})),
            nan_policy="skip",
            max_nan_skips=1,
        )


def test_sigterm_checkpoints_and_resume_continues_exactly(tmp_path: Path) -> None:
    reference = run(tmp_path / "reference")
    stopped = run(tmp_path / "stopped", make=lambda: toy.ToyModule(sigterm_at=4))
    assert stopped.stop_reason == "signal SIGTERM" and stopped.step == 4
    assert stopped.checkpoint.name == "step=000004.ckpt"
    resumed = run(None, resume=stopped.run_dir)
    assert resumed.run_dir == stopped.run_dir and resumed.step == 6
    # Dropout draws, data order, optimiser and schedule all continue where they stopped.
    assert column(resumed, "train/loss") == column(reference, "train/loss")
    assert column(resumed, "val/mse") == column(reference, "val/mse")


def test_corrupt_shard_is_skipped_and_counted(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    np.save(shards / "shard-000.npy", np.arange(0, 8))
    (shards / "shard-001.npy").write_bytes(b"\x93NUMPY garbage, not an array")
    np.save(shards / "shard-002.npy", np.arange(8, 16))
    stream = toy.shard_stream(shards, 4)
    result = run(tmp_path / "logs", train=stream, max_steps=4, val_size=0)
    assert result.step == 4 and result.data_skipped == 1
    assert dict(column(result, "data/skipped")) == {1: "0.0", 2: "0.0", 3: "1.0", 4: "1.0"}


def test_resume_rejects_corrupt_and_foreign_checkpoints(tmp_path: Path) -> None:
    result = run(tmp_path, max_steps=2, val_size=0)
    last = result.run_dir / "results" / "checkpoints" / "last.ckpt"
    with pytest.raises(StateDictMismatchError, match=r"last\.ckpt does not fit this model"):
        run(None, make=lambda: toy.ToyModule(hidden=8), resume=last)
    last.write_bytes(last.read_bytes()[:-200])  # a copy cut short
    with pytest.raises(CheckpointError, match=r"last\.ckpt cannot be read"):
        run(None, resume=result.run_dir)


def test_disk_full_while_checkpointing_keeps_the_previous_one(tmp_path, monkeypatch) -> None:
    real_save, calls = torch.save, []

    def fill_disk_on_second_save(obj, file, *args, **kwargs):
        calls.append(1)
        real_save(obj, file, *args, **kwargs)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", fill_disk_on_second_save)
    with pytest.raises(CheckpointWriteError) as caught:
        run(tmp_path, val_size=0)
    assert "step=000004.ckpt failed (OSError: [Errno 28]" in str(caught.value)
    assert "step=000002.ckpt is intact" in str(caught.value)
    (root,) = (tmp_path / "toy").iterdir()
    names = sorted(p.name for p in (root / "results" / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step=000002.ckpt"]
    assert read_checkpoint(root / "results" / "checkpoints" / "last.ckpt")["step"] == 2


@pytest.mark.parametrize("precision", ["bf16", "16"])
def test_mixed_precision_trains_on_cpu(tmp_path: Path, precision: str) -> None:
    result = run(tmp_path, max_steps=2, val_size=2, precision=precision)
    assert all(np.isfinite(float(v)) for _, v in column(result, "train/loss"))
    saved = read_checkpoint(result.checkpoint)
    assert (saved["scaler"] is not None) == (precision == "16")


def test_max_time_stops_with_a_checkpoint(tmp_path: Path) -> None:
    result = run(tmp_path, max_time="0", val_size=0)
    assert result.stop_reason == "max_time" and result.step == 1
    assert read_checkpoint(result.checkpoint)["step"] == 1
