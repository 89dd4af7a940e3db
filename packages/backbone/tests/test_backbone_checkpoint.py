"""Checkpoint I/O: original .pth (restricted unpickling), safetensors, strictness, the converter."""

from __future__ import annotations

import os
import pickle
import stat
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from post3r_backbone import (
    TTT3R,
    TTT3RCheckpointError,
    TTT3RCheckpointNotFoundError,
    TTT3RConfig,
    load_checkpoint,
    read_original_checkpoint,
    save_original_checkpoint,
    save_safetensors,
)
from post3r_backbone.checkpoint import CONFIG_METADATA_KEY, to_constructor_string
from post3r_backbone.convert import main as convert_main


def outputs_of(model: TTT3R, clip: torch.Tensor):
    video, state = model.forward_video(clip, outputs="all")
    return video, state


def assert_identical(a, b):
    for name in (
        "pts3d_world",
        "conf_world",
        "pts3d_self",
        "rgb",
        "camera_pose",
        "state_candidate",
    ):
        assert torch.equal(getattr(a[0], name), getattr(b[0], name)), name
    assert torch.equal(a[1].tokens, b[1].tokens) and torch.equal(a[1].memory, b[1].memory)


def test_round_trip_original_pth_then_safetensors(tiny_model, frames, tmp_path, capsys):
    clip = frames[:, :2]
    reference = outputs_of(tiny_model, clip)

    original = tmp_path / "tiny.pth"
    save_original_checkpoint(tiny_model, original)
    from_pth = load_checkpoint(original)
    assert from_pth.config == tiny_model.config
    assert_identical(outputs_of(from_pth, clip), reference)

    converted = tmp_path / "tiny.safetensors"
    assert convert_main([str(original), str(converted), "--quiet"]) == 0
    assert "12 alias keys stored once" in capsys.readouterr().out
    with safe_open(converted, framework="pt") as file:
        assert TTT3RConfig.from_json(file.metadata()[CONFIG_METADATA_KEY]) == tiny_model.config
        assert not any(".layer_rn." in key for key in file.keys())  # noqa: SIM118
    from_safetensors = load_checkpoint(converted)
    assert_identical(outputs_of(from_safetensors, clip), reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "tiny.pth",
        "tiny.safetensors",
    ]  # no temp files
    plain = tmp_path / "plain-open"
    plain.write_bytes(b"")  # the converted weights are as readable as any file opened here
    assert stat.S_IMODE(converted.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    plain.unlink()

    # The aliased DPT convolutions are one parameter after loading.
    head = from_safetensors.downstream_head.dpt_self.scratch
    assert head.layer_rn[0].weight is head.layer1_rn.weight


def test_update_rule_override_and_the_default_for_original_files(tiny_model, tmp_path):
    path = tmp_path / "tiny.pth"
    save_original_checkpoint(tiny_model, path)
    assert load_checkpoint(path).update_rule == "ttt3r"
    assert load_checkpoint(path, model_update_type="cut3r").update_rule == "cut3r"


def test_omegaconf_args_and_training_extras_are_read_without_omegaconf_classes(
    tiny_model, tmp_path
):
    omegaconf = pytest.importorskip("omegaconf")
    args = omegaconf.OmegaConf.create(
        {"model": to_constructor_string(tiny_model.config), "lr": 1e-4, "data": {"num_views": 64}}
    )
    path = tmp_path / "train.pth"
    torch.save({"model": tiny_model.state_dict(), "args": args, "epoch": 3, "optimizer": {}}, path)
    config, state_dict, ignored = read_original_checkpoint(path)
    assert config == tiny_model.config
    assert ignored == ["args", "epoch", "optimizer"]
    assert set(state_dict) == set(tiny_model.state_dict())


class _Exploit:
    """Pickles to a call of os.system: a safe loader must not run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_never_executed(tiny_model, tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "hostile.pth"
    args = {"model": to_constructor_string(tiny_model.config), "hook": _Exploit(marker)}
    torch.save({"model": tiny_model.state_dict(), "args": args}, path)
    model = load_checkpoint(path)
    assert not marker.exists()
    assert model.config == tiny_model.config


def test_ddp_module_prefix_is_stripped(tiny_model, tmp_path):
    path = tmp_path / "ddp.pth"
    state = {f"module.{key}": value for key, value in tiny_model.state_dict().items()}
    args = {"model": to_constructor_string(tiny_model.config)}
    torch.save({"model": state, "args": args}, path)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded.pose_token, tiny_model.pose_token)


def _save_with(tiny_model: TTT3R, path: Path, edit) -> Path:
    state = dict(tiny_model.state_dict())
    edit(state)
    torch.save({"model": state, "args": {"model": to_constructor_string(tiny_model.config)}}, path)
    return path


def test_wrong_checkpoints_list_missing_unexpected_and_misshaped_keys(tiny_model, tmp_path):
    def break_it(state):
        del state["enc_norm.weight"]
        state["extra.weight"] = torch.zeros(3)
        state["pose_token"] = torch.zeros(1, 1, 65)

    path = _save_with(tiny_model, tmp_path / "broken.pth", break_it)
    with pytest.raises(TTT3RCheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "1 missing keys:\n    enc_norm.weight" in message
    assert "1 unexpected keys:\n    extra.weight" in message
    assert "pose_token: checkpoint (1, 1, 65) vs model (1, 1, 64)" in message
    assert str(path) in message


def test_checkpoint_for_another_architecture_is_refused(tiny_model, tmp_path):
    path = tmp_path / "model.pth"
    save_original_checkpoint(tiny_model, path)
    with pytest.raises(TTT3RCheckpointError, match=r"missing keys|mis-shaped keys"):
        load_checkpoint(path, config=TTT3RConfig.preset("tiny", enc_depth=3))


def test_missing_file_says_where_the_checkpoint_comes_from(tmp_path):
    with pytest.raises(TTT3RCheckpointNotFoundError) as error:
        load_checkpoint(tmp_path / "cut3r_512_dpt_4_64.pth")
    message = str(error.value)
    assert "cut3r_512_dpt_4_64.pth" in message and "CUT3R" in message
    assert "checkpoints/cut3r_512_dpt_4_64.pth" in message


def test_unreadable_and_incomplete_files_get_clear_errors(tiny_model, tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(TTT3RCheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(garbage)
    whole = tmp_path / "whole.pth"
    save_original_checkpoint(tiny_model, whole)
    truncated = tmp_path / "truncated.pth"  # an interrupted download
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(
        TTT3RCheckpointError, match=r"not a readable PyTorch checkpoint.*fetch it again"
    ):
        load_checkpoint(truncated)
    corrupt = tmp_path / "corrupt.pth"  # a valid zip whose pickle is cut short
    with zipfile.ZipFile(whole) as source, zipfile.ZipFile(corrupt, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            target.writestr(
                item, data[: len(data) // 3] if item.filename.endswith(".pkl") else data
            )
    with pytest.raises(TTT3RCheckpointError, match="UnpicklingError"):
        load_checkpoint(corrupt)
    no_args = tmp_path / "no_args.pth"
    torch.save({"model": tiny_model.state_dict()}, no_args)
    with pytest.raises(TTT3RCheckpointError, match="no model constructor string"):
        load_checkpoint(no_args)
    assert load_checkpoint(no_args, config=tiny_model.config).config == tiny_model.config
    plain = tmp_path / "plain.pth"
    torch.save(tiny_model.state_dict(), plain)
    with pytest.raises(TTT3RCheckpointError, match="no 'model' state dict"):
        load_checkpoint(plain)
    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(1)}, bare)
    with pytest.raises(TTT3RCheckpointError, match="metadata"):
        load_checkpoint(bare)


def test_safetensors_round_trip_directly(tiny_model, tmp_path):
    path = tmp_path / "direct.safetensors"
    save_safetensors(tiny_model, path)
    loaded = load_checkpoint(path).state_dict()
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_converter_refuses_to_overwrite_and_reports_errors(tiny_model, tmp_path, capsys):
    source = tmp_path / "tiny.pth"
    save_original_checkpoint(tiny_model, source)
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"keep me")
    with pytest.raises(SystemExit):
        convert_main([str(source), str(target)])
    assert target.read_bytes() == b"keep me"
    assert "--overwrite" in capsys.readouterr().err

    def poison(state):
        state["enc_norm.weight"] = torch.full_like(state["enc_norm.weight"], float("nan"))

    poisoned = _save_with(tiny_model, tmp_path / "nan.pth", poison)
    assert convert_main([str(poisoned), str(target), "--overwrite", "--quiet"]) == 1
    assert "enc_norm.weight contains NaN" in capsys.readouterr().err
    assert target.read_bytes() == b"keep me"  # failed conversions leave the output alone
    assert convert_main([str(tmp_path / "absent.pth"), str(target), "--overwrite"]) == 1
    assert "cut3r_512_dpt_4_64.pth" in capsys.readouterr().err


def test_restricted_unpickler_keeps_foreign_objects_inert():
    from post3r_backbone import safe_pickle

    payload = pickle.dumps({"args": _Exploit(Path("/nonexistent/marker")), "n": {1, 2}})
    loaded = safe_pickle.Unpickler(__import__("io").BytesIO(payload)).load()
    assert isinstance(loaded["args"], safe_pickle.StandIn)
    assert loaded["args"].qualified_name in ("posix.system", "nt.system")
    assert loaded["n"] == {1, 2}


def test_linear_head_checkpoint_loads_from_its_own_args(frames, tmp_path):
    torch.manual_seed(0)
    model = TTT3R(TTT3RConfig.preset("tiny", head_type="linear", img_size=(224, 224))).freeze()
    path = tmp_path / "linear.pth"
    save_original_checkpoint(model, path)
    loaded = load_checkpoint(path)
    assert loaded.config.head_type == "linear"
    assert_identical(outputs_of(loaded, frames[:, :2]), outputs_of(model, frames[:, :2]))
