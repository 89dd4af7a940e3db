"""configs/post3r_reference.yaml: the reference POST3R's choices load, build at full size (on the
meta device: no weights, no memory) and train a step at tiny sizes."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_train_model_composition import grads_missing, make_batch
from train_model_runs import TINY_VIT

from post3r_slots import RecurrentSlotCorrector
from post3r_train.config import load_config
from post3r_train.model import POST3RModel


def test_reference_config_has_the_reference_choices():
    cfg = load_config("post3r_reference")
    m = cfg.model
    assert (m.num_slots, m.slot_dim, m.num_iterations) == (7, 64, 3)
    assert m.slots.grouper == "recurrent" and m.slots.predictor == "none"
    assert m.encoder.name == "dinov2" and m.encoder.timm_model == "vit_base_patch14_dinov2"
    assert m.teacher.name == "cached" and list(m.feature_decoder.hidden_dims) == [512]
    assert (cfg.loss.feature_weight, cfg.loss.pointmap_weight) == (1.0, 1.0)
    assert cfg.loss.contrastive_weight == 0
    assert (cfg.dataset.name, cfg.dataset.image_size, cfg.dataset.batch_size) == ("ytvis", 518, 1)
    assert cfg.optim.lr == 1e-4 and cfg.trainer.gradient_clip_val == 0.05


def test_reference_config_builds_at_full_size_on_the_meta_device():
    cfg = load_config("post3r_reference", ["model.encoder.pretrained=false"])
    with torch.device("meta"):
        model = POST3RModel.from_config(cfg)
    corrector = model.processor.corrector
    assert isinstance(corrector, RecurrentSlotCorrector)
    assert len(corrector.blocks) == 3 and corrector.blocks[0].num_heads == 1
    assert corrector.detach_gate and model.processor.detach_between_frames
    assert model.processor.predictor is None
    assert model.processor.initializer.base.noise_std == 0.01
    assert model.grid == (37, 37) and corrector.grid_size == (37, 37)  # 518 / 14
    widths = [layer.out_features for layer in model.feature_decoder.layers]
    assert widths == [512, 768 + 1]  # one hidden layer of 512, then DINOv2's 768 + alpha
    assert model.pointmap_decoder.resolution == (128, 128)
    assert model.pointmap_decoder.pose_dim is not None
    assert model.num_slots == 7


def test_reference_config_trains_a_step_at_tiny_sizes():
    tiny = [
        *TINY_VIT,
        "model.teacher.name=dataset",  # ground truth in place of the cache: same decoder path
        "dataset.image_size=28",
        "model.decoder_resolution=[16,16]",
        "model.pointmap_decoder.token_dim=32",
        "model.pointmap_decoder.num_upsamples=2",
    ]
    torch.manual_seed(0)
    model = POST3RModel.from_config(load_config("post3r_reference", tiny))
    loss, parts = model.training_step(make_batch(b=2, t=3, size=28))
    loss.backward()
    assert torch.isfinite(loss) and {"feature", "pointmap"} <= set(parts)
    assert "contrastive" not in parts
    # the gate is detached, but every trainable parameter still learns
    assert grads_missing(model) == []
