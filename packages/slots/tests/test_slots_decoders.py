"""Feature and pointmap decoders: shapes, alpha compositing, batching and time folding."""

import pytest
import torch

from post3r_slots import MLPDecoder, PointmapDecoder, PointmapMLPDecoder

DS, D, N = 16, 10, 6


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_mlp_decoder_composites_per_slot_outputs():
    decoder = MLPDecoder(DS, D, N, hidden_dims=(32, 32))
    out = decoder(torch.randn(2, 4, DS))
    assert out.reconstruction.shape == (2, N, D)
    assert out.masks.shape == (2, 4, N)
    assert out.slot_features.shape == (2, 4, N, D)
    torch.testing.assert_close(out.masks.sum(1), torch.ones(2, N))
    expected = (out.slot_features * out.masks[..., None]).sum(1)
    torch.testing.assert_close(out.reconstruction, expected)


def test_mlp_decoder_equals_broadcast_slot_plus_position_mlp():
    decoder = MLPDecoder(DS, D, N, hidden_dims=(32,))
    slots = torch.randn(2, 3, DS)
    x = slots[:, :, None, :] + decoder.pos_embed  # (B, K, N, Ds), materialised
    first, last = decoder.layers
    y = last(torch.relu(first(x)))
    out = decoder(slots)
    torch.testing.assert_close(out.slot_features, y[..., :D])
    torch.testing.assert_close(out.masks, torch.softmax(y[..., D], dim=1))


def test_mlp_decoder_without_hidden_layers():
    out = MLPDecoder(DS, D, N, hidden_dims=())(torch.randn(1, 2, DS))
    assert out.reconstruction.shape == (1, N, D)


def conv_pointmap(resolution=(8, 8), pose_dim=None):
    return PointmapDecoder(DS, resolution=resolution, num_upsamples=2, token_dim=16,
                           pose_dim=pose_dim)  # fmt: skip


def mlp_pointmap(resolution=(8, 8), pose_dim=None):
    return PointmapMLPDecoder(DS, resolution=resolution, hidden_dims=(32,), pose_dim=pose_dim)


POINTMAP_DECODERS = [conv_pointmap, mlp_pointmap]


@pytest.mark.parametrize("make", [lambda: MLPDecoder(DS, D, N, hidden_dims=(32,)),
                                  lambda: conv_pointmap(pose_dim=7),
                                  lambda: mlp_pointmap(pose_dim=7)])  # fmt: skip
def test_decoders_fold_time_into_batch(make):
    decoder = make()
    slots = torch.randn(2, 3, 4, DS)
    args = () if isinstance(decoder, MLPDecoder) else (torch.randn(2, 3, 7),)
    video = decoder(slots, *args)
    for t in range(3):
        frame = decoder(slots[:, t], *(a[:, t] for a in args))
        for video_field, frame_field in zip(video, frame, strict=True):
            assert video_field.shape[:2] == (2, 3)
            torch.testing.assert_close(video_field[:, t], frame_field)


@pytest.mark.parametrize("make", POINTMAP_DECODERS)
def test_pointmap_decoder_shapes_and_compositing(make):
    decoder = make(resolution=(16, 8))
    out = decoder(torch.randn(2, 5, DS))
    assert out.pointmap.shape == (2, 16, 8, 3)
    assert out.masks.shape == out.alpha_logits.shape == (2, 5, 16, 8)
    assert out.slot_pointmaps.shape == (2, 5, 16, 8, 3)
    torch.testing.assert_close(out.masks, torch.softmax(out.alpha_logits, dim=1))
    torch.testing.assert_close(out.masks.sum(1), torch.ones(2, 16, 8))
    expected = (out.slot_pointmaps * out.masks[..., None]).sum(1)
    torch.testing.assert_close(out.pointmap, expected)


@pytest.mark.parametrize("make", POINTMAP_DECODERS)
def test_pointmap_decoder_decodes_each_slot_independently(make):
    decoder = make(pose_dim=7)
    slots, pose = torch.randn(2, 3, DS), torch.randn(2, 7)
    together = decoder(slots, pose)
    for k in range(3):
        alone = decoder(slots[:, k : k + 1], pose)
        torch.testing.assert_close(alone.slot_pointmaps[:, 0], together.slot_pointmaps[:, k])
        torch.testing.assert_close(alone.alpha_logits[:, 0], together.alpha_logits[:, k])
    moved = decoder(slots, pose + 1)
    assert not torch.allclose(moved.slot_pointmaps, together.slot_pointmaps)


def test_pointmap_mlp_decoder_cells_are_the_mlp_of_slot_and_position():
    """Cell (y, x) of slot k is the MLP of [slot k, pose] plus the cell's row-major embedding."""
    decoder = mlp_pointmap(resolution=(4, 2), pose_dim=7)
    slots, pose = torch.randn(2, 3, DS), torch.randn(2, 7)
    out = decoder(slots, pose)
    inputs = torch.cat((slots, decoder.pose_embed(pose)[:, None].expand(-1, 3, -1)), dim=-1)
    first, last = decoder.mlp.layers
    y = last(torch.relu(first(inputs[:, :, None, :] + decoder.mlp.pos_embed)))  # (B, K, 8, 4)
    torch.testing.assert_close(out.slot_pointmaps, y[..., :3].unflatten(2, (4, 2)))
    torch.testing.assert_close(out.alpha_logits, y[..., 3].unflatten(2, (4, 2)))


@pytest.mark.parametrize("make", POINTMAP_DECODERS)
def test_pointmap_decoder_pose_errors(make):
    posed = make(pose_dim=7)
    with pytest.raises(ValueError, match="pose is required"):
        posed(torch.randn(1, 2, DS))
    with pytest.raises(ValueError, match=r"pose must have shape \(B, P\) with P=7"):
        posed(torch.randn(1, 2, DS), torch.randn(1, 6))
    with pytest.raises(ValueError, match="pose was given"):
        make()(torch.randn(1, 2, DS), torch.randn(1, 7))


def test_pointmap_decoder_resolution_error():
    with pytest.raises(ValueError, match="divisible by 2"):
        PointmapDecoder(DS, resolution=(20, 16), num_upsamples=3)
