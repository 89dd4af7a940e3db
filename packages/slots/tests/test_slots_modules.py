"""Slot attention, initialisers, predictor, recurrent decoder and the video processor."""

import pytest
import torch

from post3r_kernels import grid_positions
from post3r_slots import (
    CarryOverInit,
    FixedLearnedInit,
    GaussianInit,
    RecurrentSlotCorrector,
    SlotAttention,
    SlotVideoProcessor,
    TransformerPredictor,
    slot_grid_positions,
)

D, DS = 12, 16


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize(("batch", "num_slots"), [(2, 5), (1, 1), (1, 4), (3, 1)])
def test_slot_attention_shapes_and_masks_sum_to_one(batch, num_slots):
    attention = SlotAttention(D, DS)
    slots, masks = attention(torch.randn(batch, num_slots, DS), torch.randn(batch, 9, D))
    assert slots.shape == (batch, num_slots, DS)
    assert masks.shape == (batch, num_slots, 9)
    torch.testing.assert_close(masks.sum(dim=1), torch.ones(batch, 9))


def test_slot_attention_is_equivariant_to_permuting_slots():
    attention = SlotAttention(D, DS, iterations=3)
    slots, features = torch.randn(2, 6, DS), torch.randn(2, 10, D)
    permutation = torch.randperm(6)
    out = attention(slots, features)
    permuted = attention(slots[:, permutation], features)
    torch.testing.assert_close(permuted.slots, out.slots[:, permutation])
    torch.testing.assert_close(permuted.masks, out.masks[:, permutation])


def test_slot_attention_iterations_follow_first_frame_flag():
    attention = SlotAttention(D, DS, iterations=1, first_frame_iterations=2)
    slots, features = torch.randn(1, 3, DS), torch.randn(1, 5, D)
    once = attention(slots, features)
    twice_by_hand = attention(once.slots, features)
    first = attention(slots, features, first_frame=True)
    torch.testing.assert_close(first.slots, twice_by_hand.slots)
    torch.testing.assert_close(attention(slots, features, iterations=2).slots, first.slots)


def test_implicit_gradient_keeps_values_and_backpropagates_through_the_last_iteration_only():
    torch.manual_seed(0)
    attention = SlotAttention(D, DS, iterations=3)
    slots = torch.randn(2, 3, DS, requires_grad=True)
    features = torch.randn(2, 5, D, requires_grad=True)
    full = attention(slots, features)
    attention.implicit_gradient = True
    implicit = attention(slots, features)
    torch.testing.assert_close(implicit.slots, full.slots)
    torch.testing.assert_close(implicit.masks, full.masks)

    # Oracle: two iterations as a constant, then one differentiable iteration whose input
    # carries the initial slots' gradient unchanged (straight-through).
    implicit.slots.square().sum().backward()
    got = (slots.grad.clone(), features.grad.clone(), attention.to_q.weight.grad.clone())
    for tensor in (slots, features, *attention.parameters()):
        tensor.grad = None
    attention.implicit_gradient = False
    converged = attention(slots, features, iterations=2).slots.detach().requires_grad_()
    attention(converged, features, iterations=1).slots.square().sum().backward()
    torch.testing.assert_close(got[0], converged.grad)
    torch.testing.assert_close(got[1], features.grad)
    torch.testing.assert_close(got[2], attention.to_q.weight.grad)
    assert not torch.allclose(got[1], torch.autograd.grad(full.slots.square().sum(), features)[0])


def test_slot_attention_without_mlp_and_bad_settings():
    attention = SlotAttention(D, DS, mlp_hidden_dim=0)
    assert attention.mlp is None
    assert attention(torch.randn(1, 2, DS), torch.randn(1, 4, D)).slots.shape == (1, 2, DS)
    with pytest.raises(ValueError, match="iterations must be >= 1, got 0"):
        SlotAttention(D, DS, iterations=0)
    with pytest.raises(ValueError, match="first_frame_iterations must be >= 1, got 0"):
        SlotAttention(D, DS, first_frame_iterations=0)  # was silently replaced by iterations
    with pytest.raises(ValueError, match="iterations must be >= 1, got 0"):
        attention(torch.randn(1, 2, DS), torch.randn(1, 4, D), iterations=0)  # was empty masks


def test_fixed_learned_init_is_shared_and_deterministic():
    init = FixedLearnedInit(4, DS)
    slots = init(3)
    assert slots.shape == (3, 4, DS)
    torch.testing.assert_close(slots[0], slots[2])
    torch.testing.assert_close(init(3), slots)


def test_fixed_learned_init_noise_only_in_training_with_the_given_std():
    torch.manual_seed(0)
    init = FixedLearnedInit(4, DS, noise_std=0.01)
    noisy = init(256)
    deviation = noisy - init.slots
    assert 0.009 < float(deviation.std()) < 0.011  # one draw per (sample, slot, channel)
    noisy.sum().backward()  # the noise is added, the learned slots still get the gradient
    assert init.slots.grad is not None and bool((init.slots.grad == 256).all())
    init.eval()
    torch.testing.assert_close(init(3), init.slots.expand(3, -1, -1))
    with pytest.raises(ValueError, match="noise_std must be >= 0"):
        FixedLearnedInit(4, DS, noise_std=-1.0)


def test_gaussian_init_samples_in_training_and_is_repeatable_in_eval():
    init = GaussianInit(4, DS)
    first, second = init(2), init(2)
    assert first.shape == (2, 4, DS) and not torch.equal(first, second)
    (first.sum() + second.square().sum()).backward()
    assert init.mean.grad is not None and init.log_std.grad is not None  # reparameterised
    init.eval()
    torch.testing.assert_close(init(2), init(2))
    assert not torch.equal(init(2)[0, 0], init(2)[0, 1])
    assert init(2, num_slots=7).shape == (2, 7, DS)
    init.eval_mode = "mean"
    torch.testing.assert_close(init(2), init.mean.expand(2, 4, DS))
    with pytest.raises(ValueError, match="eval_mode"):
        GaussianInit(4, DS, eval_mode="median")


def test_seeded_eval_slots_do_not_depend_on_the_batch():
    # A DDP-sharded evaluation groups videos differently per rank: each video must get the same
    # starting slots (and so the same corrected slots) whatever its batch and position in it.
    init = GaussianInit(4, DS).eval()
    torch.testing.assert_close(init(3)[2], init(1)[0])
    torch.testing.assert_close(init(3), GaussianInit(4, DS).eval()(3))  # same seed, same noise
    assert not torch.equal(init(1), GaussianInit(4, DS, eval_seed=1).eval()(1))
    processor = SlotVideoProcessor(init, SlotAttention(D, DS), TransformerPredictor(DS)).eval()
    features = torch.randn(3, 2, 5, D)
    together = processor(features)
    for sample in range(3):
        alone = processor(features[sample : sample + 1])
        torch.testing.assert_close(together.slots[sample], alone.slots[0])
        torch.testing.assert_close(together.masks[sample], alone.masks[0])
    assert not torch.allclose(together.slots[0], together.slots[1])


def test_carry_over_init_resets_per_sample():
    base = FixedLearnedInit(3, DS)
    carry = CarryOverInit(base)
    previous = torch.randn(2, 3, DS)
    slots, fresh = carry(2)
    torch.testing.assert_close(slots, base(2))
    assert fresh.tolist() == [True, True]
    slots, fresh = carry(2, previous)
    torch.testing.assert_close(slots, previous)
    assert fresh.tolist() == [False, False]
    slots, fresh = carry(2, previous, torch.tensor([False, True]))
    torch.testing.assert_close(slots[0], previous[0])
    torch.testing.assert_close(slots[1], base(1)[0])
    assert fresh.tolist() == [False, True]
    with pytest.raises(ValueError, match=r"reset must have shape \(B\) with B=2"):
        carry(2, previous, torch.tensor([True]))
    with pytest.raises(ValueError, match="carried slots must match"):
        carry(2, torch.randn(2, 5, DS), torch.tensor([False, True]))


def test_carry_over_init_detach_cuts_the_gradient_to_previous_slots():
    previous = torch.randn(2, 3, DS, requires_grad=True)
    for detach, reaches in ((False, True), (True, False)):
        slots = CarryOverInit(FixedLearnedInit(3, DS), detach=detach)(2, previous).slots
        assert slots.requires_grad == reaches
        if reaches:
            (grad,) = torch.autograd.grad(slots.sum(), previous)
            torch.testing.assert_close(grad, torch.ones_like(grad))


def test_predictor_is_equivariant_and_rejects_bad_heads():
    predictor = TransformerPredictor(DS, num_heads=4)
    slots = torch.randn(2, 5, DS)
    permutation = torch.randperm(5)
    torch.testing.assert_close(predictor(slots[:, permutation]), predictor(slots)[:, permutation])
    with pytest.raises(ValueError, match="divisible by num_heads"):
        TransformerPredictor(18, num_heads=4)


def test_predictor_uses_standard_attention_scaling():
    predictor = TransformerPredictor(DS, num_heads=2).eval()
    block = predictor.blocks[0]
    slots = torch.randn(1, 4, DS)
    # Recompute the block by hand with softmax(q kᵀ / √head_dim).
    x = block.norm1(slots)
    q, k, v = (x @ block.self_attn.in_proj_weight.T + block.self_attn.in_proj_bias).chunk(3, -1)
    split = lambda t: t.unflatten(-1, (2, -1)).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    attended = torch.softmax(q @ k.transpose(-2, -1) / (DS // 2) ** 0.5, dim=-1) @ v
    x = slots + block.self_attn.out_proj(attended.transpose(1, 2).flatten(2))
    x = x + block.linear2(torch.relu(block.linear1(block.norm2(x))))
    torch.testing.assert_close(predictor(slots), x)


def test_slot_grid_positions():
    expected = [[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [2, 1], [3, 0]]
    assert slot_grid_positions(7).tolist() == expected
    assert slot_grid_positions(1).tolist() == [[0, 0]]
    assert slot_grid_positions(0).shape == (0, 2)


def test_old_recurrent_slot_decoder_name_still_works_with_a_warning():
    import post3r_slots

    with pytest.warns(DeprecationWarning, match="RecurrentSlotCorrector"):
        assert post3r_slots.RecurrentSlotDecoder is RecurrentSlotCorrector


def test_recurrent_slot_decoder_gate_and_positions():
    decoder = RecurrentSlotCorrector(D, 32, num_blocks=2, num_heads=2)
    slots, features = torch.randn(2, 3, 32), torch.randn(2, 12, D)
    with pytest.raises(ValueError, match="grid_size"):
        decoder(slots, features)
    positions = grid_positions(3, 4).expand(2, -1, -1)
    first = decoder(slots, features, first_frame=True, positions=positions)
    assert first.slots.shape == (2, 3, 32) and first.masks.shape == (2, 3, 12)
    assert first.gate.shape == (2, 3) and bool(((first.gate > 0) & (first.gate < 1)).all())
    torch.testing.assert_close(first.masks.sum(1), torch.ones(2, 12))
    later = decoder(slots, features, positions=positions)
    gate = later.gate[..., None]
    torch.testing.assert_close(later.slots, gate * first.slots + (1 - gate) * slots)
    gridded = RecurrentSlotCorrector(D, 32, num_blocks=2, num_heads=2, grid_size=(3, 4))
    gridded.load_state_dict(decoder.state_dict())
    torch.testing.assert_close(gridded(slots, features).slots, later.slots)


def test_recurrent_decoder_sees_patches_through_their_rope_positions():
    # Patches are a set located by their positions: moving features together with positions
    # changes nothing (masks follow the patches), moving features alone changes the slots.
    decoder = RecurrentSlotCorrector(D, 32, num_blocks=2, num_heads=2)
    slots, features = torch.randn(1, 3, 32), torch.randn(1, 12, D)
    positions = grid_positions(3, 4)[None]
    order = torch.randperm(12)
    out = decoder(slots, features, positions=positions)
    moved = decoder(slots, features[:, order], positions=positions[:, order])
    torch.testing.assert_close(moved.slots, out.slots)
    torch.testing.assert_close(moved.gate, out.gate)
    torch.testing.assert_close(moved.masks, out.masks[..., order])
    shuffled = decoder(slots, features[:, order], positions=positions)
    assert not torch.allclose(shuffled.slots, out.slots, atol=1e-4)


def test_recurrent_decoder_detach_gate_stops_gradients_through_the_gate():
    slots, features = torch.randn(1, 2, 32), torch.randn(1, 4, D)
    for detach in (False, True):
        decoder = RecurrentSlotCorrector(D, 32, num_blocks=1, num_heads=2, detach_gate=detach)
        out = decoder(slots, features)
        assert out.gate.requires_grad != detach
        assert out.slots.requires_grad  # the blocks still train


def test_recurrent_gate_is_computed_per_sample():
    decoder = RecurrentSlotCorrector(D, 32, num_blocks=1, num_heads=2)
    slots, features = torch.randn(3, 2, 32), torch.randn(3, 16, D)
    together = decoder(slots, features)
    alone = decoder(slots[1:2], features[1:2])
    torch.testing.assert_close(together.gate[1:2], alone.gate)
    torch.testing.assert_close(together.slots[1:2], alone.slots)


def test_recurrent_decoder_rejects_bad_heads_and_positions():
    with pytest.raises(ValueError, match="multiple of 4"):
        RecurrentSlotCorrector(D, 24, num_heads=4)
    decoder = RecurrentSlotCorrector(D, 32, num_heads=2)
    with pytest.raises(ValueError, match="integer tensor"):
        decoder(torch.randn(1, 2, 32), torch.randn(1, 4, D), positions=torch.zeros(1, 4, 2))


def make_processor(predictor=True, **kwargs):
    attention = SlotAttention(D, DS, iterations=1, first_frame_iterations=2)
    return SlotVideoProcessor(
        FixedLearnedInit(3, DS),
        attention,
        TransformerPredictor(DS) if predictor else None,
        **kwargs,
    )


def test_processor_matches_a_manual_scan():
    processor = make_processor()
    features = torch.randn(2, 3, 5, D)
    out = processor(features)
    assert out.slots.shape == out.predicted.shape == (2, 3, 3, DS)
    assert out.masks.shape == (2, 3, 3, 5)
    slots = processor.initializer.base(2)
    for t in range(3):
        corrected, masks = processor.corrector(slots, features[:, t], first_frame=t == 0)
        slots = processor.predictor(corrected)
        torch.testing.assert_close(out.slots[:, t], corrected)
        torch.testing.assert_close(out.masks[:, t], masks)
        torch.testing.assert_close(out.predicted[:, t], slots)


def test_processor_continues_a_video_across_calls_with_per_sample_reset():
    processor = make_processor()
    features = torch.randn(2, 4, 5, D)
    whole = processor(features)
    head = processor(features[:, :2])
    tail = processor(features[:, 2:], previous_slots=head.predicted[:, -1])
    torch.testing.assert_close(torch.cat((head.slots, tail.slots), 1), whole.slots)
    # Sample 1 starts a new video at frame 2: it must match a fresh run on its last frames.
    mixed = processor(
        features[:, 2:], previous_slots=head.predicted[:, -1], reset=torch.tensor([False, True])
    )
    fresh = processor(features[1:, 2:])
    torch.testing.assert_close(mixed.slots[0], tail.slots[0])
    torch.testing.assert_close(mixed.slots[1], fresh.slots[0])
    torch.testing.assert_close(mixed.masks[1], fresh.masks[0])


def test_processor_detach_between_frames_cuts_gradients_to_earlier_frames():
    features = torch.randn(1, 2, 5, D, requires_grad=True)
    for detach, reaches in ((False, True), (True, False)):
        processor = make_processor(predictor=False, detach_between_frames=detach)
        out = processor(features)
        (grad,) = torch.autograd.grad(out.slots[:, 1].sum(), features)
        assert bool(grad[:, 0].abs().sum() > 0) == reaches


def test_processor_with_recurrent_decoder_and_positions():
    decoder = RecurrentSlotCorrector(D, 32, num_blocks=1, num_heads=2)
    processor = SlotVideoProcessor(FixedLearnedInit(3, 32), decoder)
    features = torch.randn(2, 2, 6, D)
    positions = grid_positions(2, 3).expand(2, 2, -1, -1)
    out = processor(features, positions=positions)
    assert out.slots.shape == (2, 2, 3, 32)
    torch.testing.assert_close(out.predicted, out.slots)  # no predictor: carried over
    torch.testing.assert_close(processor(features, positions=positions[:, 0]).slots, out.slots)
