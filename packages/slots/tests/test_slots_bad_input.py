"""Bad input to the slots API: a clear error naming the argument, or documented behaviour."""

from __future__ import annotations

import pytest
import torch

from post3r_slots import (
    FixedLearnedInit,
    GaussianInit,
    MLPDecoder,
    PointmapDecoder,
    SlotAttention,
    VideoARI,
    pointmap_loss,
)


def with_nan(shape: tuple[int, ...]) -> torch.Tensor:
    tensor = torch.randn(shape)
    tensor.view(-1)[1] = float("nan")
    return tensor


def test_slot_attention_refuses_nan_features_and_slots() -> None:
    attention = SlotAttention(8, 16)
    with pytest.raises(ValueError, match="features contains NaN"):
        attention(torch.randn(2, 3, 16), with_nan((2, 5, 8)))
    with pytest.raises(ValueError, match="slots contains NaN"):
        attention(with_nan((2, 3, 16)), torch.randn(2, 5, 8))


def test_decoders_refuse_nan_slots() -> None:
    with pytest.raises(ValueError, match="slots contains NaN"):
        PointmapDecoder(16, resolution=(8, 8), num_upsamples=1)(with_nan((2, 3, 16)))
    with pytest.raises(ValueError, match="slots contains NaN"):
        MLPDecoder(16, 8, num_patches=4, hidden_dims=(8,))(with_nan((2, 3, 16)))


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: SlotAttention(0, 8), "feature_dim"),
        (lambda: SlotAttention(8, 0), "slot_dim"),
        (lambda: FixedLearnedInit(0, 8), "num_slots"),
        (lambda: GaussianInit(-3, 8), "num_slots"),
        (lambda: GaussianInit(3, 0), "slot_dim"),
        (lambda: GaussianInit(3, 8)(2, num_slots=-1), "num_slots"),
    ],
)
def test_zero_or_negative_sizes_are_refused_by_name(build, name: str) -> None:
    with pytest.raises(ValueError, match=rf"{name} must be (a whole number )?>= 1"):
        build()


def test_slot_attention_refuses_zero_slots() -> None:
    with pytest.raises(ValueError, match=r"at least one slot \(K >= 1\)"):
        SlotAttention(8, 16)(torch.randn(2, 0, 16), torch.randn(2, 5, 8))


def test_video_ari_refuses_nan_masks() -> None:
    metric = VideoARI()
    target = torch.randint(0, 3, (1, 2, 4, 4))
    masks = torch.rand(1, 2, 3, 4, 4)
    masks[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="pred masks contains NaN"):
        metric.update(masks, target)


def test_pointmap_loss_without_any_valid_pixel_is_nan_not_zero() -> None:
    prediction = torch.randn(1, 2, 4, 4, 3)
    target = torch.full((1, 2, 4, 4, 3), float("nan"))
    assert torch.isnan(pointmap_loss(prediction, target).loss)
    valid = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    confidence = torch.ones(1, 2, 4, 4)
    result = pointmap_loss(
        prediction, torch.randn(1, 2, 4, 4, 3), valid=valid, confidence=confidence
    )
    assert torch.isnan(result.loss) and all(torch.isnan(v) for v in result.parts.values())
    valid[0, 0, 0, 0] = True  # one valid pixel is enough for a finite loss
    result = pointmap_loss(prediction, torch.randn(1, 2, 4, 4, 3), valid=valid)
    assert torch.isfinite(result.loss)
