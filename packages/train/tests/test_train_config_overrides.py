"""Run config: YAML + key=value overrides that really apply, unknown keys rejected with a hint."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from post3r_train.config import (
    CONFIG_DIR,
    ConfigError,
    load_config,
    optim_config,
    resolved,
    trainer_config,
)
from post3r_train.engine import RunDir


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_shipped_config_loads(name):
    cfg = load_config(name)
    assert cfg.model.num_slots >= 1
    trainer_config(cfg).validate()
    optim_config(cfg).validate()


def test_named_configs_are_package_data_so_an_installed_wheel_finds_them():
    import post3r_train
    from post3r_train.config import resolve_config_path

    package = Path(post3r_train.__file__).parent
    assert {"default", "smoke", "ytvis2021"} <= {p.stem for p in CONFIG_DIR.glob("*.yaml")}
    for name in ("default", "ytvis2021"):
        assert resolve_config_path(name).parent == package / "configs"


def test_original_keys_override_nested_values():
    cfg = load_config(
        "smoke",
        [
            "model.num_slots=9",
            "model.slot_dim=48",
            "model.num_iterations=3",
            "model.decoder_resolution=[32,32]",
            "dataset.batch_size=3",
            "dataset.chunk_size=5",
            "trainer.max_steps=17",
            "trainer.precision=bf16",
            "trainer.devices=4",
            "model.encoder.patch_size=8",
        ],
    )
    assert (cfg.model.num_slots, cfg.model.slot_dim, cfg.model.num_iterations) == (9, 48, 3)
    assert list(cfg.model.decoder_resolution) == [32, 32]
    assert (cfg.dataset.batch_size, cfg.dataset.chunk_size) == (3, 5)
    assert cfg.dataset.train_resampling is True
    # The key is kept for users of the original, but the stream always resamples.
    with pytest.raises(ConfigError, match="train_resampling=false is not supported"):
        load_config("smoke", ["dataset.train_resampling=false"])
    assert trainer_config(cfg).max_steps == 17
    assert trainer_config(cfg).precision_mode == "bf16"
    assert cfg.trainer.devices == 4
    assert cfg.model.encoder.patch_size == 8


def test_learning_rate_and_weight_decay_reach_the_optimiser():
    cfg = load_config("smoke", ["model.learning_rate=0.0123", "model.weight_decay=0.5"])
    optim = optim_config(cfg)
    assert optim.lr == pytest.approx(0.0123)
    assert optim.weight_decay == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("model.num_slot=3", "model.num_slots"),
        ("trainer.max_step=3", "trainer.max_steps"),
        ("dataset.batchsize=3", "dataset.batch_size"),
        ("model.encoder.nme=patch", "model.encoder.name"),
    ],
)
def test_unknown_key_is_rejected_with_the_closest_key(override, suggestion):
    with pytest.raises(ConfigError, match=f"unknown config key .*did you mean {suggestion}"):
        load_config("smoke", [override])


def test_unknown_key_in_a_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("model:\n  num_slotz: 4\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml.*num_slotz.*did you mean model\.num_slots"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.num_slots=many", "model.num_slots"),
        ("model.encoder.name=resnet", "model.encoder.name='resnet' is not one of"),
        ("trainer.precision=8", "trainer.precision"),
        ("dataset.batch_size=0", "dataset.batch_size must be > 0"),
        ("model.feature_decoder.target=encoder", "collapses"),
        ("model.encoder.name=ttt3r", "model.teacher.name=ttt3r"),
        ("nokeyvalue", "is not key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", [override])


def test_missing_config_file_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="smoke"):
        load_config("no-such-config")


def test_saved_config_is_resolved_and_reloads_identically(tmp_path):
    cfg = load_config("smoke", ["model.learning_rate=0.002"])
    run = RunDir(tmp_path / "run")  # what a run writes: its config, resolved
    run.root.mkdir()
    run.save_config(resolved(cfg))
    path = run.config_path
    text = path.read_text()
    assert "${" not in text  # interpolations resolved
    assert not list(path.parent.glob("*.tmp"))
    again = load_config(path)
    assert OmegaConf.to_container(again, resolve=True) == OmegaConf.to_container(cfg, resolve=True)
    assert optim_config(again).lr == pytest.approx(0.002)


def test_default_config_is_the_embedded_synthetic_default():
    cfg = load_config(None)
    assert cfg.dataset.name == "synthetic"
    assert cfg.model.encoder.name == "patch"
    assert cfg.model.teacher.name == "dataset"
    assert cfg.trainer.accelerator == "cpu"
    assert Path(CONFIG_DIR / "default.yaml").is_file()


def test_synthetic_section_carries_every_scene_knob_of_post3r_data():
    import dataclasses

    from post3r_data import SynthConfig
    from post3r_train.data import scene_config

    cfg = load_config(
        "default", ["dataset.synthetic.shapes=[box]", "dataset.synthetic.shadows=false"]
    )
    scene = scene_config(cfg)
    assert scene.shapes == ("box",) and scene.shadows is False
    schema = set(load_config("default").dataset.synthetic.keys())
    assert {f.name for f in dataclasses.fields(SynthConfig)} <= schema  # no knob left out
