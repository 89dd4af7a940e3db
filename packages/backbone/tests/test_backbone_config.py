"""Config: presets, overrides, validation and safe parsing of original constructor strings."""

from __future__ import annotations

import math

import pytest
import torch

from post3r_backbone import (
    TTT3R,
    TTT3RConfig,
    TTT3RConfigError,
    config_from_constructor_string,
    parse_constructor_string,
)
from post3r_backbone.config import matching_preset

# The `model` strings of CUT3R's configs dpt_512_vary_4_64.yaml and linear_224_fixed_16.yaml.
RELEASED_512 = (
    "ARCroco3DStereo(ARCroco3DStereoConfig(freeze='encoder', state_size=768, state_pe='2d', "
    "pos_embed='RoPE100', rgb_head=True, pose_head=True, patch_embed_cls='ManyAR_PatchEmbed', "
    "img_size=(512, 512), head_type='dpt', output_mode='pts3d+pose', "
    "depth_mode=('exp', -inf, inf), "
    "conf_mode=('exp', 1, inf), pose_mode=('exp', -inf, inf), enc_embed_dim=1024, enc_depth=24, "
    "enc_num_heads=16, dec_embed_dim=768, dec_depth=12, dec_num_heads=12, landscape_only=False))"
)
LINEAR_224 = (
    "ARCroco3DStereo(ARCroco3DStereoConfig(freeze='encoder', state_size=768, state_pe='2d', "
    "pos_embed='RoPE100', rgb_head=True, pose_head=True,  img_size=(224, 224), head_type='linear', "
    "output_mode='pts3d+pose', depth_mode=('exp', -inf, inf), conf_mode=('exp', 1, inf), "
    "pose_mode=('exp', -inf, inf), enc_embed_dim=1024, enc_depth=24, enc_num_heads=16, "
    "dec_embed_dim=768, dec_depth=12, dec_num_heads=12))"
)


def test_released_constructor_string_gives_the_released_architecture():
    config = config_from_constructor_string(RELEASED_512)
    assert matching_preset(config) == "ttt3r_512"
    assert config.patch_embed_cls == "ManyAR_PatchEmbed"
    assert config.depth_mode == ("exp", -math.inf, math.inf)
    # Not set by the string: the original's defaults apply, and the update rule is ours.
    assert (config.local_mem_size, config.state_dec_num_heads, config.ray_enc_depth) == (256, 16, 2)
    assert config.model_update_type == "ttt3r"


def test_linear_224_string_gives_the_linear_preset():
    config = config_from_constructor_string(LINEAR_224)
    assert matching_preset(config) == "cut3r_224_linear"
    assert config.landscape_only is True  # the original default; ignored (images used as given)


def test_parser_evaluates_nothing():
    for text, offending in [
        (
            "ARCroco3DStereo(ARCroco3DStereoConfig(state_size=__import__('os').getpid()))",
            "__import__",
        ),
        ("ARCroco3DStereo(ARCroco3DStereoConfig(state_size=open('x')))", "open"),
        ("ARCroco3DStereoConfig(norm_layer=partial(nn.LayerNorm, eps=1e-6))", "partial"),
        ("ARCroco3DStereo(ARCroco3DStereoConfig(state_size=2**10))", "2**10"),
    ]:
        with pytest.raises(TTT3RConfigError, match="unsupported expression") as error:
            parse_constructor_string(text)
        assert offending in str(error.value)
    with pytest.raises(TTT3RConfigError, match="expected ARCroco3DStereo"):
        parse_constructor_string("os.system('ls')")
    with pytest.raises(TTT3RConfigError, match="syntax"):
        parse_constructor_string("ARCroco3DStereo(")


def test_parser_accepts_literal_forms():
    kwargs = parse_constructor_string(
        "ARCroco3DStereoConfig(depth_mode=['exp', -float('inf'), float('inf')], "
        "state_size=+8, x=None)"
    )
    assert kwargs == {"depth_mode": ("exp", -math.inf, math.inf), "state_size": 8, "x": None}


def test_unknown_keys_are_rejected_with_a_suggestion():
    with pytest.raises(TTT3RConfigError, match="did you mean 'state_size'"):
        TTT3RConfig.preset("tiny", state_sise=8)
    with pytest.raises(TTT3RConfigError, match="unknown TTT3R config key 'norm_layer'"):
        config_from_constructor_string(
            "ARCroco3DStereoConfig(norm_layer=1, output_mode='pts3d+pose', pose_head=True, "
            "pos_embed='RoPE100')"
        )
    with pytest.raises(TTT3RConfigError, match="unknown preset"):
        TTT3RConfig.preset("huge")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"enc_num_heads": 3}, "encoder"),
        ({"state_dec_num_heads": 32}, "multiple of 4"),
        ({"img_size": (60, 64)}, "multiple of patch_size"),
        ({"model_update_type": "lerp"}, "model_update_type"),
        ({"pos_embed": "cosine"}, "RoPE"),
        ({"head_type": "conv"}, "head_type"),
        ({"pose_head": False}, "pose_head"),
        ({"dec_depth": 1}, "dec_depth"),
        ({"depth_mode": ("exp", 0, math.inf)}, "depth_mode"),
        ({"local_mem_size": 0}, "local_mem_size must be an int >= 1, got 0"),
        ({"ray_enc_depth": -1}, "ray_enc_depth must be an int >= 0, got -1"),
        ({"state_size": 16.0}, "state_size must be an int >= 1, got 16.0"),
        ({"img_size": (64, 64, 64)}, "img_size must be an int or \\(height, width\\)"),
    ],
)
def test_invalid_values_are_rejected(overrides, message):
    with pytest.raises(TTT3RConfigError, match=message):
        TTT3RConfig.preset("tiny", **overrides)


def test_json_round_trip_keeps_infinities_and_tuples():
    config = TTT3RConfig.preset("tiny", state_size=32)
    assert TTT3RConfig.from_json(config.to_json()) == config
    as_strings = config.to_dict() | {"depth_mode": ["exp", "-inf", "inf"], "img_size": [64, 64]}
    assert TTT3RConfig.from_dict(as_strings) == config


def test_presets_build_and_state_grid_matches_the_original_rule():
    assert TTT3RConfig.preset("ttt3r_512").state_grid_width == 28  # isqrt(768) = 27, made even
    assert TTT3RConfig.preset("tiny").state_grid_width == 4
    with torch.device("meta"):
        model = TTT3R(TTT3RConfig.preset("tiny", head_type="linear"))
    assert model.config.head_type == "linear"


def test_update_rule_is_switchable_and_checked():
    with torch.device("meta"):
        model = TTT3R(TTT3RConfig.preset("tiny"))
    assert model.update_rule == "ttt3r"
    model.update_rule = "cut3r"
    assert model.config.model_update_type == "cut3r"
    with pytest.raises(TTT3RConfigError):
        model.update_rule = "average"
