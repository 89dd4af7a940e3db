"""Unusable checkpoint files get errors that say what is wrong with them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from post3r_train.engine import CheckpointError, read_checkpoint


class RunsACommand:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_an_empty_checkpoint_is_named_as_empty(tmp_path: Path) -> None:
    (tmp_path / "step=000002.ckpt").write_bytes(b"")
    torch.save({"format": "post3r-train-checkpoint"}, tmp_path / "step=000001.ckpt")
    with pytest.raises(CheckpointError, match=r"step=000002\.ckpt is empty \(0 bytes\)") as caught:
        read_checkpoint(tmp_path / "step=000002.ckpt")
    assert "resume from another checkpoint" in str(caught.value)
    assert "step=000001.ckpt" in str(caught.value)


def test_a_pickle_holding_code_is_refused_as_such(tmp_path: Path, capfd) -> None:
    path = tmp_path / "last.ckpt"
    torch.save({"format": "post3r-train-checkpoint", "step": RunsACommand()}, path)
    with pytest.raises(CheckpointError, match="holds objects a training checkpoint must not hold"):
        read_checkpoint(path)
    assert "must never run" not in capfd.readouterr().out
