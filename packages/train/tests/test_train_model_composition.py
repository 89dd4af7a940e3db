"""POST3R composition: gradients everywhere, frozen parts kept out of the state, the encoders and
teachers by config, the 3D metric and the frame conventions."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_model_runs import TINY_TTT3R, TINY_VIT

from post3r_train.config import load_config
from post3r_train.encoders import IMAGENET_MEAN, IMAGENET_STD, DinoV2Encoder, MissingWeightsError
from post3r_train.geometry import object_point_errors, to_first_camera
from post3r_train.model import POST3RModel
from post3r_train.teacher import MissingTargetError, TeacherOutput


def make_batch(b=2, t=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(b, t, size, size, dtype=torch.long)
    q = size // 8
    ids[..., q : 4 * q, q : 4 * q] = 1
    ids[..., 5 * q : 7 * q, 4 * q : 7 * q] = 2
    depth = 5.0 + torch.rand(b, t, size, size, generator=g)
    points = torch.stack(
        [
            torch.randn(b, t, size, size, generator=g),
            torch.randn(b, t, size, size, generator=g),
            depth,
        ],
        -1,
    )
    return {
        "frames": torch.rand(b, t, 3, size, size, generator=g),
        "segmentations": ids,
        "pointmap": points,
        "camera_to_world": torch.eye(4).expand(b, t, 4, 4).clone(),
    }


def build(*overrides):
    torch.manual_seed(0)
    return POST3RModel.from_config(load_config("smoke", list(overrides)))


def grads_missing(model):
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize(
    "overrides",
    [(), ("model.slots.initializer=fixed", "model.slots.predictor=none")],
    ids=["default", "fixed-init-no-predictor"],
)
def test_every_trainable_parameter_gets_a_gradient(overrides):
    model = build(*overrides)
    loss, parts = model.training_step(make_batch())
    loss.backward()
    assert grads_missing(model) == []
    assert {"feature", "pointmap", "contrastive"} <= set(parts)
    weights = model.loss_cfg
    expected = (
        weights.feature_weight * parts["feature"]
        + weights.pointmap_weight * parts["pointmap"]
        + weights.contrastive_weight * parts["contrastive"]
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_zero_weight_terms_build_no_decoder_and_still_every_parameter_learns():
    model = build("loss.pointmap_weight=0", "loss.contrastive_weight=0")
    assert model.pointmap_decoder is None
    loss, parts = model.training_step(make_batch())
    loss.backward()
    assert grads_missing(model) == []
    assert set(parts) == {"feature"}


def test_frozen_dinov2_and_ttt3r_stay_out_of_the_trainable_state():
    model = build(*TINY_VIT, *TINY_TTT3R)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("teacher.backbone.") for n in frozen)
    assert any(n.startswith("encoder.vit.") for n in frozen)
    state = model.trainable_state_dict()
    assert not any(k.startswith(("teacher.", "encoder.")) for k in state)
    assert set(state) == {n for n, p in model.named_parameters() if p.requires_grad}
    loss, _ = model.training_step(make_batch())
    loss.backward()
    assert grads_missing(model) == []
    assert all(p.grad is None for p in model.teacher.parameters())
    fresh = build(*TINY_VIT, *TINY_TTT3R)
    fresh.load_trainable_state_dict(state)
    assert torch.equal(fresh.input_projection[1].weight, model.input_projection[1].weight)


def test_frozen_parts_stay_in_eval_mode():
    model = build(*TINY_VIT, *TINY_TTT3R).train()
    assert not model.encoder.training and not model.teacher.training
    assert model.processor.training


def test_dinov2_encoder_is_block_n_of_imagenet_normalised_frames():
    encoder = DinoV2Encoder(
        pretrained=False,
        block=1,
        image_size=28,
        timm_kwargs={"embed_dim": 24, "depth": 2, "num_heads": 2},
    )
    frames = torch.rand(1, 2, 3, 28, 28)
    out = encoder(frames)
    assert out.features.shape == (1, 2, 4, 24) and out.grid == (2, 2)
    vit = encoder.vit
    x = (frames[0] - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        3, 1, 1
    )
    tokens = vit._pos_embed(vit.patch_embed(x))
    tokens = vit.blocks[0](vit.norm_pre(vit.patch_drop(tokens)))
    expected = tokens[:, vit.num_prefix_tokens :]
    torch.testing.assert_close(out.features[0], expected, rtol=1e-4, atol=1e-5)


def test_dinov2_weights_load_from_safetensors_and_pth(tmp_path):
    from safetensors.torch import save_file

    kwargs = {"embed_dim": 24, "depth": 2, "num_heads": 2}
    source = DinoV2Encoder(pretrained=False, image_size=28, block=2, timm_kwargs=kwargs)
    state = {k: v.contiguous() for k, v in source.vit.state_dict().items()}
    save_file(state, tmp_path / "vit.safetensors")
    torch.save({"model": state}, tmp_path / "vit.pth")
    frames = torch.rand(1, 1, 3, 28, 28)
    for name in ("vit.safetensors", "vit.pth"):
        loaded = DinoV2Encoder(weights=tmp_path / name, image_size=28, block=2, timm_kwargs=kwargs)
        torch.testing.assert_close(loaded(frames).features, source(frames).features)


def test_dinov2_without_weights_is_a_clear_error(tmp_path):
    with pytest.raises(MissingWeightsError, match=r"model\.encoder\.weights"):
        build("model.encoder.name=dinov2", "model.feature_decoder.target=encoder")
    with pytest.raises(MissingWeightsError, match="no such file"):
        build(
            "model.encoder.name=dinov2",
            "model.feature_decoder.target=encoder",
            f"model.encoder.weights={tmp_path / 'missing.safetensors'}",
        )


def test_dinov2_missing_weights_error_names_the_model_and_where_weights_come_from(tmp_path):
    missing = f"model.encoder.weights={tmp_path / 'missing.safetensors'}"
    with pytest.raises(MissingWeightsError) as caught:
        build("model.encoder.name=dinov2", "model.feature_decoder.target=encoder", missing)
    message = str(caught.value)
    assert "{timm_model}" not in message and "huggingface.co/timm/vit_" in message


def test_ttt3r_teacher_takes_the_checkpoint_from_the_environment(tmp_path, monkeypatch):
    from post3r_backbone import TTT3R, TTT3RConfig
    from post3r_backbone.checkpoint import save_original_checkpoint

    torch.manual_seed(0)
    saved = TTT3R(TTT3RConfig.preset("tiny"))
    save_original_checkpoint(saved, tmp_path / "tiny.pth")
    monkeypatch.setenv("POST3R_BACKBONE_CHECKPOINT", str(tmp_path / "tiny.pth"))
    overrides = [o for o in TINY_TTT3R if "random_weights" not in o]
    teacher = build(*overrides).teacher.backbone
    for name, value in saved.state_dict().items():
        assert torch.equal(teacher.state_dict()[name], value), name


def test_ttt3r_teacher_without_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("POST3R_BACKBONE_CHECKPOINT", raising=False)
    monkeypatch.chdir(tmp_path)  # no checkpoints/cut3r_512_dpt_4_64.pth here
    with pytest.raises(FileNotFoundError, match=r"model\.teacher\.checkpoint=PATH or \$POST3R"):
        build("model.teacher.name=ttt3r")
    with pytest.raises(FileNotFoundError, match="not found"):
        build("model.teacher.name=ttt3r", f"model.teacher.checkpoint={tmp_path / 'none.pth'}")


def test_ttt3r_teacher_runs_each_clip_from_a_fresh_state_on_raw_frames():
    model = build(*TINY_TTT3R, "model.encoder.name=ttt3r", "model.feature_decoder.target=encoder")
    batch = make_batch()
    teacher = model.teacher(batch)
    backbone = model.teacher.backbone
    # The oracle: the backbone stepped frame by frame from init_state, frames in [0, 1].
    state = backbone.init_state(2)
    for t in range(2):
        out, state = backbone.step(batch["frames"][:, t], state)
        torch.testing.assert_close(teacher.pointmap[:, t], out.pts3d_world)
        torch.testing.assert_close(teacher.tokens[:, t], out.enc_tokens)
    # A clip is independent of what ran before (the state never leaks between clips).
    model.teacher(make_batch(seed=5))
    torch.testing.assert_close(model.teacher(batch).pointmap, teacher.pointmap)
    loss, parts = model.training_step(batch)
    loss.backward()
    assert grads_missing(model) == []
    assert "pointmap/log_confidence" in parts  # the teacher's confidence is used


def test_dataset_teacher_without_pointmaps_says_what_is_missing():
    batch = make_batch()
    del batch["pointmap"]
    with pytest.raises(MissingTargetError, match="pointmap"):
        build().training_step(batch)


def test_wrong_frame_size_is_rejected():
    with pytest.raises(ValueError, match=r"built for \(32, 32\)"):
        build().training_step(make_batch(size=48))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f * 255, r"span \[0.*, 255\] but must be in \[0, 1\]"),
        (lambda f: f * 2 - 1, r"span \[-1.*, 1.*\] but must be in \[0, 1\]"),
        (lambda f: f.index_fill(0, torch.tensor([1]), float("nan")), "NaN or infinite"),
        (lambda f: f.index_fill(0, torch.tensor([0]), float("inf")), "NaN or infinite"),
    ],
    ids=["0-255 floats", "pre-normalised", "nan", "inf"],
)
def test_frames_are_checked_as_strictly_as_the_backbone_does(change, message):
    batch = make_batch()
    batch["frames"] = change(batch["frames"])
    with pytest.raises(ValueError, match=message):
        build().training_step(batch)


def test_one_frame_clips_warn_once_that_the_contrastive_term_is_left_out():
    import warnings

    from post3r_train import losses

    losses._warn_single_frame_contrastive.cache_clear()
    model = build()
    with pytest.warns(UserWarning, match=r"contrastive_weight=.* clips have one frame"):
        _, parts = model.training_step(make_batch(t=1))
    assert "contrastive" not in parts
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second batch does not warn again
        model.training_step(make_batch(t=1))


def test_uint8_frames_are_accepted():
    batch = make_batch()
    batch["frames"] = (batch["frames"] * 255).round().to(torch.uint8)
    loss, _ = build().training_step(batch)
    assert torch.isfinite(loss)


def test_first_camera_frame_makes_frame_zero_the_identity():
    b, t = 1, 3
    angle = torch.tensor(0.3)
    pose = torch.eye(4).repeat(b, t, 1, 1)
    pose[:, :, 0, 0], pose[:, :, 0, 2] = angle.cos(), angle.sin()
    pose[:, :, 2, 0], pose[:, :, 2, 2] = -angle.sin(), angle.cos()
    pose[:, :, :3, 3] = torch.tensor([1.0, 2.0, 3.0])
    pose[:, 1, 0, 3] += 0.5
    camera_points = torch.randn(b, t, 4, 4, 3)
    world = (
        torch.einsum("btij,bthwj->bthwi", pose[..., :3, :3], camera_points)
        + pose[:, :, None, None, :3, 3]
    )
    moved = to_first_camera(TeacherOutput(world, None, pose))
    torch.testing.assert_close(
        moved.camera_to_world[:, 0], torch.eye(4).expand(b, 4, 4), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(moved.pointmap[:, 0], camera_points[:, 0], atol=1e-5, rtol=0)


def test_object_point_error_is_zero_for_a_scaled_perfect_prediction():
    batch = make_batch(b=1, t=2, size=16)
    ids = batch["segmentations"]
    k = 3
    masks = torch.nn.functional.one_hot(ids, k).movedim(-1, 2).float()  # slot = object id
    truth = batch["pointmap"]
    slot_points = (2.5 * truth)[:, :, None].expand(-1, -1, k, -1, -1, -1)
    errors = object_point_errors(2.5 * truth, slot_points, masks, batch)
    assert errors.object_error.shape == (2,)
    torch.testing.assert_close(errors.object_error, torch.zeros(2), atol=1e-5, rtol=0)
    # each object gets another slot's points
    wrong = torch.where(masks[..., None].bool(), 0.0, 2.5 * truth[:, :, None])
    assert (object_point_errors(2.5 * truth, wrong, masks, batch).object_error > 0.5).all()


def _posed_batch(b=1, t=3, size=32):
    """Camera-frame points (depth 4..6) seen from cameras that turn and move."""
    g = torch.Generator().manual_seed(3)
    camera_points = torch.randn(b, t, size, size, 3, generator=g) * 0.3
    camera_points[..., 2] += 5.0
    poses = torch.eye(4).repeat(b, t, 1, 1)
    for i in range(t):
        angle = torch.tensor(0.2 * i)
        poses[:, i, 0, 0], poses[:, i, 0, 2] = angle.cos(), angle.sin()
        poses[:, i, 2, 0], poses[:, i, 2, 2] = -angle.sin(), angle.cos()
        poses[:, i, :3, 3] = torch.tensor([0.5 * i, 0.1, -0.2 * i])
    world = torch.einsum("btij,bthwj->bthwi", poses[..., :3, :3], camera_points)
    world = world + poses[:, :, None, None, :3, 3]
    batch = make_batch(b=b, t=t, size=size)
    batch.update(pointmap=world, camera_to_world=poses)
    return batch, camera_points


def test_camera_frame_decoder_sees_each_frames_own_camera_and_returns_world_points(monkeypatch):
    from post3r_slots import PointmapDecoderOutput

    model = build(
        "model.pointmap_decoder.frame=camera",
        "model.pointmap_decoder.pose_conditioned=false",
        "model.decoder_resolution=[32,32]",
        "model.pointmap_decoder.num_upsamples=1",
    )
    batch, camera_points = _posed_batch()
    out = model(batch)
    torch.testing.assert_close(out.pointmap.target.points, camera_points, atol=1e-4, rtol=0)
    # A decoder that predicts the camera-frame truth (at half its scale) must come out, after
    # the poses, as the truth in the first camera's frame.
    k = model.num_slots

    def perfect(slots, pose=None):
        b, t = slots.shape[:2]
        points = 0.5 * out.pointmap.target.points
        masks = torch.full((b, t, k, 32, 32), 1.0 / k)
        return PointmapDecoderOutput(
            points, masks, points[:, :, None].expand(-1, -1, k, -1, -1, -1), masks
        )

    monkeypatch.setattr(model.pointmap_decoder, "forward", perfect)
    out = model(batch)
    first = torch.linalg.inv(batch["camera_to_world"][:, 0])
    truth = torch.einsum("bij,bthwj->bthwi", first[:, :3, :3], batch["pointmap"])
    truth = truth + first[:, None, None, None, :3, 3]
    torch.testing.assert_close(out.pointmap.pointmap, truth, atol=1e-3, rtol=0)
    torch.testing.assert_close(out.pointmap.slot_pointmaps[:, :, 0], truth, atol=1e-3, rtol=0)
    _loss, parts = model.losses(out)
    assert parts["pointmap"] < 1e-4  # scale-invariant: half the scale is still perfect


def test_fourier_positions_are_fixed_and_not_checkpointed():
    from post3r_train.build import fourier_positions

    model = build("model.feature_decoder.position_embedding=fourier")
    embed = model.feature_decoder.pos_embed
    assert not embed.requires_grad
    assert "feature_decoder.pos_embed" not in model.trainable_state_dict()
    expected = fourier_positions(model.grid, model.feature_decoder.slot_dim, 4.0)
    torch.testing.assert_close(embed.detach(), expected)
    assert expected.norm(dim=1).mean() == pytest.approx(1.0, rel=1e-5)
    # Sines and cosines: the similarity of two patches depends only on their offset.
    grid = expected.view(*model.grid, -1)
    torch.testing.assert_close(grid[0, 0] @ grid[1, 2], grid[3, 2] @ grid[4, 4])
    loss, _ = model.training_step(make_batch())
    loss.backward()
    assert grads_missing(model) == []


@pytest.mark.parametrize("pose", ["true", "false"])
def test_mlp_pointmap_decoder_by_config(pose):
    from post3r_slots import PointmapMLPDecoder
    from post3r_train.build import fourier_positions

    model = build(
        "model.pointmap_decoder.architecture=mlp",
        "model.pointmap_decoder.position_embedding=fourier",
        "model.pointmap_decoder.hidden_dims=[32]",
        f"model.pointmap_decoder.pose_conditioned={pose}",
    )
    decoder = model.pointmap_decoder
    assert isinstance(decoder, PointmapMLPDecoder)
    assert decoder.resolution == tuple(model.pointmap_decoder.resolution)
    embed = decoder.mlp.pos_embed
    assert not embed.requires_grad
    torch.testing.assert_close(
        embed.detach(), fourier_positions(decoder.resolution, decoder.mlp.slot_dim, 4.0)
    )
    out = model(make_batch())
    assert out.pointmap is not None
    assert out.pointmap.masks.shape[-2:] == decoder.resolution
    loss, _ = model.losses(out)
    loss.backward()
    assert grads_missing(model) == []


def test_unknown_pointmap_architecture_is_refused():
    from post3r_train.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model\.pointmap_decoder\.architecture"):
        load_config("smoke", ["model.pointmap_decoder.architecture=unet"])


def test_build_parts_draws_initial_weights_in_the_documented_order():
    """A seed must keep giving the same weights: the modules are built in the order teacher,
    encoder, input projection, slot processor, feature decoder, pointmap decoder (a reordering
    silently turned seed 0 of the embedded default into another run)."""
    from post3r_train import build

    cfg = load_config("default", [])
    torch.manual_seed(0)
    parts = build.build_parts(cfg)
    torch.manual_seed(0)
    m, side = cfg.model, cfg.dataset.synthetic.resolution
    teacher = build.build_teacher(m)
    _, feature_dim, grid = build.build_encoder(m, teacher, (side, side))
    patch_area = (side // grid[0]) * (side // grid[1])
    in_order = [
        build.build_input_projection(m, feature_dim),
        build.build_processor(m, grid),
        build.build_feature_decoder(m, 3 * patch_area, grid),
        build.build_pointmap_decoder(m),
    ]
    built = [parts[k] for k in ("input_projection", "processor")]
    built += [parts["feature_decoder"], parts["pointmap_decoder"]]
    for expected, actual in zip(in_order, built, strict=True):
        for (name, a), (_, b) in zip(
            expected.state_dict().items(), actual.state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), name
