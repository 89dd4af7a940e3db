"""End to end: gradients reach every parameter, input errors, mask utilities, README example."""

import re
from pathlib import Path

import pytest
import torch

import post3r_slots as ps

B, T, N, D, K, DS = 2, 3, 16, 12, 3, 32


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def trainable(*modules):
    return [(name, p) for m in modules for name, p in m.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("corrector_kind", ["slot_attention", "recurrent"])
def test_gradients_reach_every_trainable_parameter(corrector_kind):
    if corrector_kind == "slot_attention":
        corrector = ps.SlotAttention(D, DS, iterations=1, first_frame_iterations=2)
        initializer = ps.GaussianInit(K, DS)
    else:
        corrector = ps.RecurrentSlotCorrector(D, DS, num_blocks=2, num_heads=2)
        initializer = ps.FixedLearnedInit(K, DS)
    processor = ps.SlotVideoProcessor(initializer, corrector, ps.TransformerPredictor(DS))
    feature_decoder = ps.MLPDecoder(DS, D, N, hidden_dims=(24,))
    pointmap_decoder = ps.PointmapDecoder(
        DS, resolution=(8, 8), pose_dim=7, num_upsamples=2, token_dim=16, min_channels=8
    )
    features = torch.randn(B, T, N, D)
    out = processor(features)
    decoded = feature_decoder(out.slots)
    points = pointmap_decoder(out.slots, torch.randn(B, T, 7))
    loss = (
        ps.feature_reconstruction_loss(decoded.reconstruction, features).loss
        + ps.pointmap_loss(
            points.pointmap, torch.randn(B, T, 16, 16, 3), confidence=torch.rand(B, T, 16, 16) + 1
        ).loss
        + ps.slot_contrastive_loss(out.slots, symmetric=True).loss
    )
    loss.backward()
    modules = (processor, feature_decoder, pointmap_decoder)
    missing = [name for name, p in trainable(*modules) if p.grad is None or not p.grad.any()]
    assert not missing, f"no gradient reached: {missing}"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: ps.SlotAttention(D, DS)(torch.randn(B, K, DS), torch.randn(B, N)),
         r"features must have shape \(B, N, D\) \(3 dims\), got \(2, 16\)"),
        (lambda: ps.SlotAttention(D, DS)(torch.randn(B, K, DS), torch.randn(B, N, D + 1)),
         r"features must have shape \(B, N, D\) with D=12"),
        (lambda: ps.SlotAttention(D, DS)(torch.randn(B, K, DS), torch.randn(B + 1, N, D)),
         r"features must have shape \(B, N, D\) with B=2"),
        (lambda: ps.SlotAttention(D, DS)(torch.randn(B, K, DS + 1), torch.randn(B, N, D)),
         r"slots must have shape \(B, K, Ds\) with Ds=32"),
        (lambda: ps.TransformerPredictor(DS)(torch.randn(B, T, K, DS)),
         r"slots must have shape \(B, K, Ds\) \(3 dims\)"),
        (lambda: ps.SlotVideoProcessor(ps.FixedLearnedInit(K, DS), ps.SlotAttention(D, DS))(
            torch.randn(B, N, D)), r"features must have shape \(B, T, N, D\)"),
        (lambda: ps.SlotVideoProcessor(ps.FixedLearnedInit(K, DS), ps.SlotAttention(D, DS))(
            torch.randn(B, T, N, D), previous_slots=torch.randn(B + 1, K, DS)),
         r"previous must have shape \(B, K, Ds\) with B=2"),
        (lambda: ps.MLPDecoder(DS, D, N)(torch.randn(K, DS)),
         r"slots must have shape \(B, T, K, Ds\) \(3 or 4 dims\)"),
        (lambda: ps.feature_reconstruction_loss(torch.randn(B, N, D), torch.randn(B, N + 1, D)),
         r"target must have shape \(B, N, D\) with N=16"),
        (lambda: ps.patch_masks_to_image(torch.rand(B, K, 15), (8, 8)),
         r"15 patches do not form a grid"),
        (lambda: ps.slot_point_clouds(torch.randn(B, 4, 4, 3), torch.rand(B, K, 4, 5)),
         r"points must have shape \(B, H, W, 3\) with W=5"),
    ],
)  # fmt: skip
def test_bad_inputs_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_non_tensor_input_raises_type_error():
    with pytest.raises(TypeError, match=r"features must be a torch.Tensor of shape \(B, N, D\)"):
        ps.SlotAttention(D, DS)(torch.randn(B, K, DS), [[0.0] * D] * N)


def test_patch_masks_to_image_and_ids():
    masks = torch.softmax(torch.randn(B, T, K, 6), dim=2)  # a 2 x 3 patch grid
    image = ps.patch_masks_to_image(masks, (4, 6))
    assert image.shape == (B, T, K, 4, 6)
    torch.testing.assert_close(image.sum(2), torch.ones(B, T, 4, 6))
    nearest = ps.patch_masks_to_image(masks, (4, 6), mode="nearest")
    torch.testing.assert_close(nearest[..., ::2, ::2], masks.unflatten(-1, (2, 3)))
    ids = ps.patch_masks_to_ids(masks, (4, 6))
    torch.testing.assert_close(ids, image.argmax(2))
    assert ps.patch_grid_size(6, (4, 6)) == (2, 3)
    assert ps.patch_grid_size(6, (6, 4)) == (3, 2)
    tall = ps.patch_masks_to_image(masks, (4, 6), grid_size=(3, 2))
    assert tall.shape == (B, T, K, 4, 6)
    tie = torch.tensor([[[0.5], [0.5]]]).expand(1, 2, 1)[..., None]  # (1, K=2, 1, 1)
    assert ps.masks_to_ids(tie).tolist() == [[[0]]]  # ties go to the lowest slot


def test_slot_point_clouds_split_points_by_winning_slot():
    points = torch.arange(2 * 2 * 3 * 3, dtype=torch.float).view(1, 2, 2, 3, 3)  # (B, T, H, W, 3)
    ids = torch.tensor([[[[0, 1, 1], [2, 2, 0]], [[1, 1, 1], [0, 2, 2]]]])
    masks = torch.nn.functional.one_hot(ids, 3).movedim(-1, 2).float()
    valid = torch.ones(1, 2, 2, 3, dtype=torch.bool)
    valid[0, 1, 1, 2] = False
    clouds = ps.slot_point_clouds(points, masks, valid=valid)
    flat_points, flat_ids, flat_valid = points.view(-1, 3), ids.flatten(), valid.flatten()
    for k in range(3):
        expected = flat_points[(flat_ids == k) & flat_valid]
        torch.testing.assert_close(clouds[0][k], expected)
    # Per-slot pointmaps: each pixel takes the XYZ of the slot that wins it.
    per_slot = torch.stack([points + 100 * k for k in range(3)], dim=2)  # (B, T, K, H, W, 3)
    clouds = ps.slot_point_clouds(per_slot, masks)
    for k in range(3):
        torch.testing.assert_close(clouds[0][k], flat_points[flat_ids == k] + 100 * k)


def test_readme_example_runs():
    readme = Path(__file__).resolve().parents[1] / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.DOTALL)
    assert blocks, "README has no python example"
    exec(compile(blocks[0], str(readme), "exec"), {"__name__": "readme_example"})


def test_public_api_is_exported():
    for name in ps.__all__:
        assert getattr(ps, name) is not None
