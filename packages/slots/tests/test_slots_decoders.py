"""Feature and pointmap decoders: shapes, alpha compositing, batching and time folding."""

import pytest
import torch

from post3r_slots import MLPDecoder, PointmapDecoder

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


@pytest.mark.parametrize("make", [lambda: MLPDecoder(DS, D, N, hidden_dims=(32,)),
                                  lambda: PointmapDecoder(DS, resolution=(8, 8), num_upsamples=2,
                                                          token_dim=16, pose_dim=7)])  # fmt: skip
def test_decoders_fold_time_into_batch(make):
    decoder = make()
    slots = torch.randn(2, 3, 4, DS)
    args = (torch.randn(2, 3, 7),) if isinstance(decoder, PointmapDecoder) else ()
    video = decoder(slots, *args)
    for t in range(3):
        frame = decoder(slots[:, t], *(a[:, t] for a in args))
        for video_field, frame_field in zip(video, frame, strict=True):
            assert video_field.shape[:2] == (2, 3)
            torch.testing.assert_close(video_field[:, t], frame_field)


def test_pointmap_decoder_shapes_and_compositing():
    decoder = PointmapDecoder(DS, resolution=(16, 8), num_upsamples=3, token_dim=32)
    out = decoder(torch.randn(2, 5, DS))
    assert out.pointmap.shape == (2, 16, 8, 3)
    assert out.masks.shape == out.alpha_logits.shape == (2, 5, 16, 8)
    assert out.slot_pointmaps.shape == (2, 5, 16, 8, 3)
    torch.testing.assert_close(out.masks, torch.softmax(out.alpha_logits, dim=1))
    torch.testing.assert_close(out.masks.sum(1), torch.ones(2, 16, 8))
    expected = (out.slot_pointmaps * out.masks[..., None]).sum(1)
    torch.testing.assert_close(out.pointmap, expected)


def test_pointmap_decoder_decodes_each_slot_independently():
    decoder = PointmapDecoder(DS, resolution=(8, 8), num_upsamples=2, token_dim=16, pose_dim=7)
    slots, pose = torch.randn(2, 3, DS), torch.randn(2, 7)
    together = decoder(slots, pose)
    for k in range(3):
        alone = decoder(slots[:, k : k + 1], pose)
        torch.testing.assert_close(alone.slot_pointmaps[:, 0], together.slot_pointmaps[:, k])
        torch.testing.assert_close(alone.alpha_logits[:, 0], together.alpha_logits[:, k])
    moved = decoder(slots, pose + 1)
    assert not torch.allclose(moved.slot_pointmaps, together.slot_pointmaps)


def test_pointmap_decoder_pose_and_resolution_errors():
    with pytest.raises(ValueError, match="divisible by 2"):
        PointmapDecoder(DS, resolution=(20, 16), num_upsamples=3)
    posed = PointmapDecoder(DS, resolution=(8, 8), num_upsamples=2, token_dim=16, pose_dim=7)
    with pytest.raises(ValueError, match="pose is required"):
        posed(torch.randn(1, 2, DS))
    with pytest.raises(ValueError, match=r"pose must have shape \(B, P\) with P=7"):
        posed(torch.randn(1, 2, DS), torch.randn(1, 6))
    plain = PointmapDecoder(DS, resolution=(8, 8), num_upsamples=2, token_dim=16)
    with pytest.raises(ValueError, match="pose was given"):
        plain(torch.randn(1, 2, DS), torch.randn(1, 7))
