"""Streaming API: conventions, update rules, per-sample reset/gate, output selection, bad input."""

from __future__ import annotations

import pytest
import torch

from post3r_backbone import TTT3R, BackboneState, TTT3RConfig, pose_to_matrix

CLOSE = {"rtol": 1e-5, "atol": 1e-5}


def run(model: TTT3R, clip: torch.Tensor, **step_kwargs):
    """Step through a (B, T, 3, H, W) clip; returns the per-frame outputs and the final state."""
    state = model.init_state(clip.shape[0])
    outputs = []
    for t in range(clip.shape[1]):
        out, state = model.step(clip[:, t], state, **step_kwargs)
        outputs.append(out)
    return outputs, state


def test_outputs_follow_the_documented_conventions(tiny_model, frames):
    out, _ = tiny_model.step(frames[:, 0], tiny_model.init_state(2))
    assert out.pts3d_world.shape == out.pts3d_self.shape == out.rgb.shape == (2, 48, 64, 3)
    assert out.conf_world.shape == out.conf_self.shape == (2, 48, 64)
    assert out.enc_tokens.shape == (2, 12, 64) and out.dec_tokens.shape == (2, 12, 64)
    assert out.positions.tolist()[0][:5] == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0]]
    assert out.pose_token.shape == (2, 64)
    assert out.gate is None and out.state_candidate is None  # intermediates only on request
    assert (out.conf_world >= 1).all() and (out.conf_self >= 1).all()
    assert (out.rgb > 0).all() and (out.rgb < 1).all()
    quaternion = out.camera_pose[:, 3:]  # (qw, qx, qy, qz)
    torch.testing.assert_close(quaternion.norm(dim=-1), torch.ones(2))
    assert (quaternion[:, 0] >= 0).all()
    matrix = out.camera_to_world
    torch.testing.assert_close(matrix, pose_to_matrix(out.camera_pose))
    rotation = matrix[:, :3, :3]
    torch.testing.assert_close(rotation @ rotation.transpose(1, 2), torch.eye(3).expand(2, 3, 3))
    torch.testing.assert_close(torch.linalg.det(rotation), torch.ones(2))
    torch.testing.assert_close(matrix[:, :3, 3], out.camera_pose[:, :3])
    assert matrix[:, 3].tolist() == [[0, 0, 0, 1]] * 2


def test_quaternion_order_is_real_part_first():
    # 90 degrees about z: q = (cos 45, 0, 0, sin 45) maps x to y.
    half = torch.tensor(0.5).sqrt()
    pose = torch.tensor([[1.0, 2.0, 3.0, half, 0.0, 0.0, half]])
    matrix = pose_to_matrix(pose)
    torch.testing.assert_close(
        matrix[0, :3, :3] @ torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 1, 0])
    )
    torch.testing.assert_close(matrix[0, :3, 3], torch.tensor([1.0, 2, 3]))


def test_update_rules(tiny_model, frames):
    tiny_model.update_rule = "cut3r"
    state = tiny_model.init_state(2)
    for t in range(2):
        out, state = tiny_model.step(
            frames[:, t], state, outputs=["state_candidate", "memory_candidate"]
        )
        assert torch.equal(state.tokens, out.state_candidate)  # replace
        assert torch.equal(state.memory, out.memory_candidate)

    tiny_model.update_rule = "ttt3r"
    state = tiny_model.init_state(2)
    wanted = ["state_candidate", "memory_candidate", "gate"]
    out, state = tiny_model.step(frames[:, 0], state, outputs=wanted)
    assert torch.equal(state.tokens, out.state_candidate)  # first frame: full overwrite
    previous = state.tokens
    out, state = tiny_model.step(frames[:, 1], state, outputs=wanted)
    gate = out.gate[..., None]
    assert ((gate > 0) & (gate < 1)).all()
    torch.testing.assert_close(state.tokens, gate * out.state_candidate + (1 - gate) * previous)
    assert torch.equal(state.memory, out.memory_candidate)  # the pose memory is always replaced
    assert not state.fresh.any()


def test_gate_is_per_sample(tiny_model, frames):
    """Sample 0 of a batch gets exactly what it gets alone, whatever sample 1 holds."""
    tiny_model.update_rule = "ttt3r"
    alone, alone_state = run(tiny_model, frames[:1], outputs="all")
    other = torch.rand(1, 3, 3, 48, 64, generator=torch.Generator().manual_seed(7))
    batched, batched_state = run(tiny_model, torch.cat([frames[:1], other]), outputs="all")
    for single, pair in zip(alone, batched, strict=True):
        for name in (
            "pts3d_world",
            "conf_world",
            "pts3d_self",
            "camera_pose",
            "gate",
            "state_candidate",
        ):
            torch.testing.assert_close(getattr(pair, name)[:1], getattr(single, name), **CLOSE)
    torch.testing.assert_close(batched_state.tokens[:1], alone_state.tokens, **CLOSE)
    assert (batched[-1].gate[0] - batched[-1].gate[1]).abs().max() > 1e-4  # the gates differ


def test_reset_is_per_sample_and_starts_a_new_sequence(tiny_model, frames):
    clip = frames  # (2, 3, ...)
    continued, _ = run(tiny_model, clip)
    state = tiny_model.init_state(2)
    for t in range(2):
        _, state = tiny_model.step(clip[:, t], state)
    reset = torch.tensor([False, True])
    out, state = tiny_model.step(clip[:, 2], state, reset)
    fresh_run, _ = run(tiny_model, clip[1:, 2:])  # frame 2 of sample 1 as a first frame
    torch.testing.assert_close(out.pts3d_world[1:], fresh_run[0].pts3d_world, **CLOSE)
    torch.testing.assert_close(out.camera_pose[1:], fresh_run[0].camera_pose, **CLOSE)
    torch.testing.assert_close(out.pts3d_world[:1], continued[2].pts3d_world[:1], **CLOSE)
    assert not torch.allclose(out.pts3d_world[1:], continued[2].pts3d_world[1:], **CLOSE)
    assert not state.fresh.any()


def test_reset_on_a_fresh_state_changes_nothing(tiny_model, frames):
    state = tiny_model.init_state(2)
    plain, _ = tiny_model.step(frames[:, 0], state)
    reset, _ = tiny_model.step(frames[:, 0], state, torch.tensor([True, True]))
    assert torch.equal(plain.pts3d_world, reset.pts3d_world)


def test_update_false_leaves_the_state_untouched(tiny_model, frames):
    state = tiny_model.init_state(2)
    _, state = tiny_model.step(frames[:, 0], state)
    _, after = tiny_model.step(frames[:, 1], state, update=torch.tensor([True, False]))
    assert torch.equal(after.tokens[1], state.tokens[1]) and torch.equal(
        after.memory[1], state.memory[1]
    )
    assert not torch.equal(after.tokens[0], state.tokens[0])
    fresh = tiny_model.init_state(2)
    _, still_fresh = tiny_model.step(frames[:, 0], fresh, update=torch.tensor([False, True]))
    assert still_fresh.fresh.tolist() == [True, False]


def test_forward_video_equals_stepping(tiny_model, frames):
    stepped, stepped_state = run(tiny_model, frames)
    wanted = ("pts3d_world", "conf_world", "camera_pose", "dec_tokens")
    video, state = tiny_model.forward_video(frames, outputs=wanted, output_device="cpu")
    for name in wanted:
        expected = torch.stack([getattr(out, name) for out in stepped], dim=1)
        assert torch.equal(getattr(video, name), expected), name
    assert video.pts3d_self is None and video.rgb is None
    assert torch.equal(state.tokens, stepped_state.tokens)
    hooks, _ = tiny_model.forward_video(frames[:, :2], outputs=["dec_hooks"])
    assert len(hooks.dec_hooks) == 4 and hooks.dec_hooks[0].shape == (2, 2, 12, 64)


def test_forward_video_resets_per_frame(tiny_model, frames):
    resets = torch.tensor([[False, False, True], [False, False, False]])
    video, _ = tiny_model.forward_video(frames, reset=resets, outputs=["camera_pose"])
    plain, _ = tiny_model.forward_video(frames, outputs=["camera_pose"])
    first, _ = tiny_model.forward_video(frames[:1, 2:], outputs=["camera_pose"])
    torch.testing.assert_close(video.camera_pose[0, 2], first.camera_pose[0, 0], **CLOSE)
    assert not torch.allclose(video.camera_pose[0, 2], plain.camera_pose[0, 2], **CLOSE)
    # Frames before the reset, and the sample without one, are untouched.
    torch.testing.assert_close(video.camera_pose[0, :2], plain.camera_pose[0, :2], **CLOSE)
    torch.testing.assert_close(video.camera_pose[1], plain.camera_pose[1], **CLOSE)


def test_skipped_heads_do_not_change_the_rest(tiny_model, frames):
    state = tiny_model.init_state(2)
    full, full_state = tiny_model.step(frames[:, 0], state)
    pose_only, pose_state = tiny_model.step(frames[:, 0], state, outputs=["camera_pose"])
    assert torch.equal(pose_only.camera_pose, full.camera_pose)
    assert pose_only.pts3d_world is None and pose_only.enc_tokens is None
    assert torch.equal(pose_state.tokens, full_state.tokens)
    with pytest.raises(ValueError, match="unknown output names"):
        tiny_model.step(frames[:, 0], state, outputs=["depth"])


def test_uint8_frames_are_scaled(tiny_model, frames):
    as_bytes = (frames[:, 0] * 255).round().to(torch.uint8)
    state = tiny_model.init_state(2)
    from_bytes, _ = tiny_model.step(as_bytes, state)
    from_floats, _ = tiny_model.step(as_bytes.float() / 255, state)
    torch.testing.assert_close(from_bytes.pts3d_world, from_floats.pts3d_world)


def test_small_overshoot_is_clipped(tiny_model, frames):
    state = tiny_model.init_state(2)
    overshoot = frames[:, 0] * 1.1 - 0.05  # e.g. bicubic resampling ringing
    clipped, _ = tiny_model.step(overshoot, state)
    reference, _ = tiny_model.step(overshoot.clamp(0, 1), state)
    assert torch.equal(clipped.pts3d_world, reference.pts3d_world)


@pytest.mark.parametrize(
    ("make_frame", "batch", "error", "message"),
    [
        (lambda: torch.rand(2, 3, 40, 64), 2, ValueError, "multiple of the patch size"),
        (lambda: torch.rand(2, 4, 48, 64), 2, ValueError, "3 \\(RGB\\) channels"),
        (lambda: torch.rand(2, 48, 64, 3), 2, ValueError, "channels-last"),
        (
            lambda: torch.rand(2, 3, 48, 64).index_fill_(2, torch.tensor([5]), float("nan")),
            2,
            ValueError,
            "NaN",
        ),
        (lambda: torch.rand(3, 3, 48, 64), 2, ValueError, "batch size 3 does not match"),
        (lambda: torch.rand(2, 3, 48, 64) * 2 - 1, 2, ValueError, "must be in \\[0, 1\\]"),
        (lambda: torch.randint(0, 9, (2, 3, 48, 64)), 2, TypeError, "float in \\[0, 1\\] or uint8"),
        (lambda: torch.rand(3, 48, 64), 2, ValueError, "\\(B, 3, H, W\\)"),
    ],
)
def test_bad_frames_get_clear_errors(tiny_model, make_frame, batch, error, message):
    with pytest.raises(error, match=message):
        tiny_model.step(make_frame(), tiny_model.init_state(batch))


def test_bad_state_reset_and_clip_get_clear_errors(tiny_model, frames):
    state = tiny_model.init_state(2)
    with pytest.raises(ValueError, match="reset must be a bool tensor of shape \\(B,\\)"):
        tiny_model.step(frames[:, 0], state, torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="reset must be a bool tensor"):
        tiny_model.step(frames[:, 0], state, torch.tensor([1, 0]))
    with pytest.raises(TypeError, match="BackboneState"):
        tiny_model.step(frames[:, 0], {"tokens": state.tokens})
    # States of a model with another state size or memory size, or a mixed-up batch.
    for wrong in (
        BackboneState(torch.zeros(2, 32, 64), state.memory, state.fresh),
        BackboneState(state.tokens, torch.zeros(2, 4, 128), state.fresh),
        BackboneState(state.tokens, state.memory, state.fresh[:1]),
    ):
        with pytest.raises(ValueError, match="state does not belong to this model: state\\."):
            tiny_model.step(frames[:, 0], wrong)
    with pytest.raises(ValueError, match=r"is on meta but the model is on cpu.*state\.to"):
        tiny_model.step(frames[:, 0], state.to("meta"))
    with pytest.raises(
        ValueError, match="frame batch size 2 does not match the state's batch size 3"
    ):
        tiny_model.forward_video(frames, state=tiny_model.init_state(3))
    with pytest.raises(ValueError, match="\\(B, T, 3, H, W\\)"):
        tiny_model.forward_video(frames[:, 0])
    with pytest.raises(TypeError, match="outputs must be a field name"):
        tiny_model.step(frames[:, 0], state, outputs=5)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match="reset must be a bool tensor of shape \\(B,\\) = \\(2,\\) or"
    ):
        tiny_model.forward_video(frames, reset=torch.ones(2, 2, dtype=torch.bool))
    for batch_size in (0, True, 2.0):
        with pytest.raises(ValueError, match="positive int"):
            tiny_model.init_state(batch_size)  # type: ignore[arg-type]


def test_freeze_inference_mode_and_autocast(tiny_model, frames):
    model = TTT3R(TTT3RConfig.preset("tiny"))
    assert model.freeze() is model
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with torch.inference_mode():
        out, state = tiny_model.step(frames[:, 0], tiny_model.init_state(2))
        out, state = tiny_model.step(frames[:, 1], state)
    assert out.pts3d_world.isfinite().all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, low_state = tiny_model.step(frames[:, 0], tiny_model.init_state(2))
    # Heads run in float32 and the state stays float32 under autocast.
    assert low.pts3d_world.dtype == low.camera_pose.dtype == low_state.tokens.dtype == torch.float32
    full, _ = tiny_model.step(frames[:, 0], tiny_model.init_state(2))
    assert (low.camera_pose - full.camera_pose).abs().max() < 0.1


def test_gradients_flow_when_not_frozen(frames):
    torch.manual_seed(0)
    model = TTT3R(TTT3RConfig.preset("tiny"))
    with torch.inference_mode():  # caches built here must not poison later autograd use
        model.step(frames[:, 0], model.init_state(2))
    out, state = model.step(frames[:, 0], model.init_state(2))
    (out.pts3d_world.mean() + state.tokens.mean()).backward()
    assert model.enc_blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.register_tokens.weight.grad.abs().sum() > 0


def test_ray_map_is_encoded_and_added(tiny_model, frames):
    state = tiny_model.init_state(2)
    rays = torch.randn(2, 48, 64, 6, generator=torch.Generator().manual_seed(3))
    plain, _ = tiny_model.step(frames[:, 0], state, outputs=["enc_tokens"])
    with_rays, _ = tiny_model.step(frames[:, 0], state, ray_map=rays, outputs=["enc_tokens"])
    torch.testing.assert_close(
        with_rays.enc_tokens - plain.enc_tokens, tiny_model.encode_ray_map(rays)
    )
    with pytest.raises(ValueError, match="ray_map must have shape"):
        tiny_model.step(frames[:, 0], state, ray_map=rays.permute(0, 3, 1, 2))


def test_linear_head_model_streams(frames):
    torch.manual_seed(0)
    model = TTT3R(TTT3RConfig.preset("tiny", head_type="linear")).freeze()
    video, _ = model.forward_video(frames)
    assert video.pts3d_world.shape == video.pts3d_self.shape == (2, 3, 48, 64, 3)
    assert (video.pts3d_self[..., 2] >= 0).all()  # the linear head keeps self points in front
    assert video.rgb.shape == (2, 3, 48, 64, 3)


@pytest.mark.parametrize("depth", [2, 3])
def test_shallow_decoders_feed_the_heads_four_layers(depth, frames):
    """The heads read layers L/2 and 3L/4; for L = 2 both are layer 1, as in the original."""
    model = TTT3R(TTT3RConfig.preset("tiny", dec_depth=depth)).freeze()
    out, _ = model.step(frames[:, 0], model.init_state(2), outputs=["dec_hooks", "pts3d_world"])
    assert len(out.dec_hooks) == 4 and out.pts3d_world.shape == (2, 48, 64, 3)
    assert (out.dec_hooks[1] is out.dec_hooks[2]) == (depth == 2)
