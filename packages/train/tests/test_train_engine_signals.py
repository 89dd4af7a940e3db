"""Ctrl+C in `fit`: the first checkpoints at the step's end, a second one stops at once."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from post3r_train.engine import fit, read_checkpoint, seed_everything
from post3r_train.engine import signals as stop_signals

sys.path.insert(0, str(Path(__file__).parent))
import train_engine_toy as toy


class Interrupted(toy.ToyModule):
    """Presses Ctrl+C during the training steps listed in `at` (1-based calls)."""

    def __init__(self, at: tuple[int, ...]):
        super().__init__()
        self.at = at

    def training_step(self, batch):
        if self.calls + 1 in self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return super().training_step(batch)


def run(tmp_path: Path, module: toy.ToyModule):
    seed_everything(0)
    return fit(
        module,
        toy.train_stream(0, 1, 4),
        trainer=toy.small_trainer(),
        optim=toy.small_optim(),
        log_dir=tmp_path,
        experiment="toy",
    )


def test_ctrl_c_checkpoints_at_the_end_of_the_step(tmp_path: Path, capsys) -> None:
    result = run(tmp_path, Interrupted(at=(3,)))
    assert result.stop_reason == "signal SIGINT" and result.step == 3
    assert read_checkpoint(result.checkpoint)["reason"] == "signal SIGINT"
    assert "Ctrl+C again stops at once" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_a_second_ctrl_c_stops_at_once(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(stop_signals, "REPEAT_WINDOW_S", 0.0)
    module = Interrupted(at=(2,))
    original = module.training_step

    def press_twice(batch):
        if module.calls + 1 == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the first press, then the second below
        return original(batch)

    module.training_step = press_twice
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, module)
    assert module.calls == 1  # the step of the second press never ran its training_step


def test_a_forwarded_copy_of_the_same_press_is_not_a_second_one(tmp_path: Path) -> None:
    module = Interrupted(at=(2,))
    original = module.training_step

    def press_and_forward(batch):
        if module.calls + 1 == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what the elastic launcher forwards
        return original(batch)

    module.training_step = press_and_forward
    result = run(tmp_path, module)
    assert result.stop_reason == "signal SIGINT" and result.step == 2
