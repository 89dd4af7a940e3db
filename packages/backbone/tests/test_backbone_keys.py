"""State-dict layout: our module names must reproduce the original checkpoint keys exactly."""

from __future__ import annotations

import json

import torch

from post3r_backbone import TTT3R, TTT3RConfig
from post3r_backbone.checkpoint import alias_keys


def _meta_model(config: TTT3RConfig) -> TTT3R:
    with torch.device("meta"):  # shapes only, nothing allocated
        return TTT3R(config)


def test_released_preset_has_the_released_keys_and_shapes(fixture_dir):
    reference = json.loads((fixture_dir / "cut3r_512_dpt_4_64.keys.json").read_text())
    model = _meta_model(TTT3RConfig.preset("ttt3r_512"))
    ours = [(key, list(tensor.shape)) for key, tensor in model.state_dict().items()]
    assert ours == [(entry["key"], entry["shape"]) for entry in reference["keys"]]
    expected_aliases = {e["key"]: e["alias_of"] for e in reference["keys"] if "alias_of" in e}
    assert alias_keys(model) == expected_aliases
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters == reference["summary"]["total_parameters"] == 793_307_858
    assert all(p.is_meta for p in model.parameters())


def test_tiny_fixture_config_has_the_fixture_keys(tiny_reference_config, tiny_reference_keys):
    model = _meta_model(tiny_reference_config)
    ours = [(key, list(tensor.shape)) for key, tensor in model.state_dict().items()]
    assert ours == [(entry["key"], entry["shape"]) for entry in tiny_reference_keys]


def test_linear_224_head_has_the_original_layout():
    """The 224 linear-head model (cut3r_224_linear_4.pth): per-token MLPs, no DPT."""
    model = _meta_model(TTT3RConfig.preset("cut3r_224_linear"))
    head = {
        key.removeprefix("downstream_head."): list(t.shape)
        for key, t in model.state_dict().items()
        if key.startswith("downstream_head.")
    }
    pixels = 16 * 16
    expected = {
        "proj.fc1.weight": [3072, 768],
        "proj.fc2.weight": [4 * pixels, 3072],
        "rgb_proj.fc2.weight": [3 * pixels, 3072],
        "pose_head.mlp.fc2.weight": [7, 3072],
        "final_transform.1.norm2.mlp.1.weight": [1536, 768],
        "cross_proj.fc2.weight": [4 * pixels, 3072],
    }
    assert {key: head[key] for key in expected} == expected
    prefixes = list(dict.fromkeys(key.split(".")[0] for key in head))
    assert prefixes == ["proj", "rgb_proj", "pose_head", "final_transform", "cross_proj"]
    assert not alias_keys(model)
