"""`model.slots.grouper`: slot attention and POST3R's recurrent corrector, chosen by config,
both training end to end; the recurrent one learning; a bad value rejected with the choices."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_train_model_composition import grads_missing, make_batch
from train_model_runs import run_cli, smoke_run

from post3r_slots import RecurrentSlotCorrector, SlotAttention
from post3r_train.config import load_config
from post3r_train.errors import ConfigError
from post3r_train.model import POST3RModel

RECURRENT = ["model.slots.grouper=recurrent"]


def build(*overrides: str) -> POST3RModel:
    torch.manual_seed(0)
    return POST3RModel.from_config(load_config("smoke", list(overrides)))


@pytest.mark.parametrize(
    ("grouper", "corrector"),
    [("slot_attention", SlotAttention), ("recurrent", RecurrentSlotCorrector)],
)
def test_each_grouper_is_built_from_config(grouper, corrector):
    model = build(f"model.slots.grouper={grouper}", "model.num_iterations=2")
    assert type(model.processor.corrector) is corrector
    if grouper == "recurrent":  # model.num_iterations is its block count, as in the reference
        assert len(model.processor.corrector.blocks) == 2
        assert model.processor.corrector.grid_size == model.grid


def test_default_grouper_is_slot_attention():
    assert load_config("default").model.slots.grouper == "slot_attention"


@pytest.mark.parametrize("grouper", ["slot_attention", "recurrent"])
def test_each_grouper_trains_on_the_smoke_config(tmp_path, grouper):
    data = str(smoke_run().data)
    argv = ["smoke", "--data-dir", data, "--log-dir", str(tmp_path), "-q"]
    code, stdout, stderr = run_cli([*argv, f"model.slots.grouper={grouper}"])
    assert code == 0, stderr
    assert "finished at step 4" in stdout
    # both decoders' alpha masks are scored, whichever grouper made the slots
    assert "validation: ari" in stdout and "pointmap_ari" in stdout


@pytest.mark.parametrize(
    "extra",
    [(), ("model.slots.initializer=fixed", "model.slots.init_noise_std=0.01")],
    ids=["gaussian-init", "fixed-init-with-noise"],
)
def test_recurrent_grouper_gradients_reach_every_parameter(extra):
    model = build(*RECURRENT, *extra)
    corrector = model.processor.corrector
    loss, _ = model.training_step(make_batch(t=3))
    loss.backward()
    assert grads_missing(model) == []
    block_grads = [p.grad for p in corrector.blocks.parameters()]
    assert all(float(g.abs().sum()) > 0 for g in block_grads)


def test_recurrent_grouper_gate_blends_frames_and_its_masks_are_a_grouping():
    model = build(*RECURRENT, "model.slots.predictor=none").eval()
    with torch.no_grad():
        out = model(make_batch(t=3))
    masks = out.attention_masks  # (B, T, K, N): softmax over slots of the last block
    assert masks.shape == (2, 3, model.num_slots, model.grid[0] * model.grid[1])
    torch.testing.assert_close(masks.sum(2), torch.ones_like(masks.sum(2)))
    assert out.feature is not None and out.pointmap is not None  # decoders' alpha masks
    # without a predictor, frame t starts from frame t-1's slots and the gate moves them only
    # part of the way: the corrected slots change between frames, but not to a fresh start
    assert not torch.allclose(out.slots[:, 1], out.slots[:, 0])


def test_detach_between_frames_stops_gradients_through_time():
    model = build(*RECURRENT, "model.slots.detach_between_frames=true", "loss.contrastive_weight=0")
    features = torch.randn(1, 3, model.grid[0] * model.grid[1], 32, requires_grad=True)
    video = model.processor(features)
    video.slots[:, -1].sum().backward()
    assert features.grad is not None
    assert float(features.grad[:, :-1].abs().sum()) == 0  # only the last frame's features
    assert float(features.grad[:, -1].abs().sum()) > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.slots.grouper=gru"], "model.slots.grouper='gru' is not one of slot_attention, "),
        (
            ["model.slots.grouper=recurrent", "model.slot_dim=30"],
            "slot_dim / model.slots.heads must be a multiple of 4",
        ),
        (["model.slots.init_noise_std=0.01"], "set model.slots.initializer=fixed"),
    ],
)
def test_bad_grouper_settings_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", overrides)


def test_bad_grouper_on_the_command_line_is_one_line_no_traceback(tmp_path):
    code, _, stderr = run_cli(["smoke", "--log-dir", str(tmp_path), "model.slots.grouper=gru"])
    assert code != 0
    assert "model.slots.grouper='gru' is not one of slot_attention, recurrent" in stderr
    assert "Traceback" not in stderr
