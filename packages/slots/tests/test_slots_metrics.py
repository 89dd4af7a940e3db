"""FG-ARI and mBO: an independent oracle, hand-made cases, edge rules and rank splitting."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.functional.clustering import adjusted_rand_score

from post3r_slots import (
    OVERLAP_ID,
    ImageARI,
    ImageMBO,
    VideoARI,
    VideoMBO,
    adjusted_rand_index,
    instance_masks_to_ids,
    mean_best_overlap,
)

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks")


def one_hot_masks(ids: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Slot ids (B, [T,] H, W) → float one-hot masks (B, [T,] K, H, W)."""
    return F.one_hot(ids, num_slots).movedim(-1, -3).float()


def oracle_fg_ari(pred_ids: torch.Tensor, target: torch.Tensor) -> float | None:
    """sklearn-style ARI of one sample over its foreground pixels; None when it has none."""
    foreground = target != 0
    if not foreground.any():
        return None
    return float(adjusted_rand_score(pred_ids[foreground], target[foreground]))


def correlated_case(generator: torch.Generator, shape: tuple[int, ...], num_slots: int):
    """Random ids with predictions that partly follow the ground truth."""
    num_objects = int(torch.randint(1, 5, (1,), generator=generator))
    target = torch.randint(0, num_objects + 1, shape, generator=generator)
    noise = torch.randint(0, num_slots, shape, generator=generator)
    keep = torch.rand(shape, generator=generator) < torch.rand(1, generator=generator)
    pred = torch.where(keep, target % num_slots, noise)
    return pred, target


def test_fg_ari_matches_torchmetrics_oracle_on_random_cases():
    generator = torch.Generator().manual_seed(0)
    for case in range(60):
        num_slots = 1 + case % 6
        pred, target = correlated_case(generator, (3, 5, 6), num_slots)
        scores, counted = adjusted_rand_index(one_hot_masks(pred, num_slots), target)
        id_scores, id_counted = adjusted_rand_index(pred, target)
        for sample in range(3):
            expected = oracle_fg_ari(pred[sample], target[sample])
            assert bool(counted[sample]) == (expected is not None)
            assert bool(id_counted[sample]) == (expected is not None)
            if expected is not None:
                assert float(scores[sample]) == pytest.approx(expected, abs=1e-6)
                assert float(id_scores[sample]) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("pred", "target", "expected"),
    [
        ([0, 0, 1, 1], [1, 1, 1, 1], 0.0),  # one true cluster split over two slots
        ([2, 2, 2, 2], [1, 1, 1, 1], 1.0),  # one cluster, one slot
        ([0, 1, 2, 3], [1, 2, 3, 4], 1.0),  # singletons everywhere
        ([0, 0, 1, 1], [1, 1, 2, 2], 1.0),
        ([0, 0, 1, 1], [1, 2, 1, 2], -0.5),  # sklearn's worst two-by-two case
        ([3, 3, 3, 3], [0, 0, 5, 0], 1.0),  # a single foreground pixel
    ],
)
def test_fg_ari_edge_cases(pred, target, expected):
    pred, target = torch.tensor([pred]), torch.tensor([target])
    scores, counted = adjusted_rand_index(pred, target)
    assert bool(counted[0])
    assert float(scores[0]) == pytest.approx(expected)
    oracle = oracle_fg_ari(pred[0], target[0])
    assert oracle == pytest.approx(expected)


def test_empty_foreground_is_skipped_or_scored_one():
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    pred = torch.randint(0, 3, (1, 4, 4))
    scores, counted = adjusted_rand_index(pred, target)
    assert not bool(counted[0])
    scores, counted = adjusted_rand_index(pred, target, count_background_only=True)
    assert bool(counted[0]) and float(scores[0]) == 1.0
    metric = ImageARI()
    metric.update(pred, target)
    assert math.isnan(float(metric.compute()))
    mbo = ImageMBO()
    mbo.update(pred, target)
    assert math.isnan(float(mbo.compute()))


def test_background_only_frame_rule_changes_image_ari_mean():
    # Frame 0: one object split over two slots (ARI 0); frame 1: background only.
    target = torch.zeros(1, 2, 2, 4, dtype=torch.long)
    target[0, 0, 0] = 1
    pred = torch.zeros(1, 2, 2, 4, dtype=torch.long)
    pred[0, 0, 0, :2] = 1
    skip, count = ImageARI(), ImageARI(count_background_only=True)
    for metric in (skip, count):
        metric.update(pred, target)
    assert float(skip.compute()) == 0.0
    assert float(count.compute()) == 0.5


def test_without_ignore_background_the_background_is_a_cluster():
    target = torch.tensor([[[0, 0, 1, 1]]])
    pred = torch.tensor([[[1, 1, 0, 0]]])
    scores, counted = adjusted_rand_index(pred, target, ignore_background=False)
    assert bool(counted[0]) and float(scores[0]) == 1.0
    bad = torch.tensor([[[0, 0, 0, 0]]])
    scores, _ = adjusted_rand_index(bad, target, ignore_background=False)
    assert float(scores[0]) == 0.0
    scores, _ = mean_best_overlap(pred, target, ignore_background=False)
    assert float(scores[0]) == 1.0


def test_mbo_hand_cases():
    # Object 1: top-left 2x2; object 2: bottom row; slot 0 = top half, slot 1 = bottom half.
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, :2, :2] = 1
    target[0, 3] = 2
    pred = torch.zeros(1, 4, 4, dtype=torch.long)
    pred[0, 2:] = 1
    scores, counted = mean_best_overlap(pred, target)
    assert bool(counted[0]) and float(scores[0]) == pytest.approx(0.5)
    # Perfect slots give 1; a slot that also covers background is penalised.
    perfect = target.clone()
    scores, _ = mean_best_overlap(perfect, target)
    assert float(scores[0]) == pytest.approx(1.0)


def oracle_mbo(pred_ids, target, ignore_background, num_slots) -> float | None:
    """Mean over objects of the best IoU over slots, by boolean masks; overlap pixels
    (OVERLAP_ID) leave both sides. None when the sample has no object."""
    kept = target != OVERLAP_ID
    objects = [o for o in target[kept].unique().tolist() if o != 0 or not ignore_background]
    if not objects:
        return None
    best = []
    for obj in objects:
        true = (target == obj) & kept
        slots = [(pred_ids == k) & kept for k in range(num_slots)]
        best.append(max(int((true & s).sum()) / int((true | s).sum()) for s in slots))
    return sum(best) / len(best)


@pytest.mark.parametrize("ignore_background", [True, False])
def test_mbo_matches_a_mask_by_mask_oracle_on_random_cases(ignore_background):
    generator = torch.Generator().manual_seed(3)
    for case in range(30):
        num_slots = 1 + case % 5
        pred, target = correlated_case(generator, (3, 4, 5), num_slots)
        target[torch.rand(target.shape, generator=generator) < 0.1] = OVERLAP_ID
        scores, counted = mean_best_overlap(
            one_hot_masks(pred, num_slots), target, ignore_background=ignore_background,
            ignore_overlaps=True,
        )  # fmt: skip
        for sample in range(3):
            expected = oracle_mbo(pred[sample], target[sample], ignore_background, num_slots)
            assert bool(counted[sample]) == (expected is not None)
            if expected is not None:
                assert float(scores[sample]) == pytest.approx(expected, abs=1e-9)


def test_overlap_and_hungarian_matching_differ():
    # Two objects both best covered by slot 0; slot 1 holds the background.
    target = torch.tensor([[1, 1, 2, 2, 0, 0, 0, 0]])
    pred = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    overlap, _ = mean_best_overlap(pred, target, matching="overlap")
    hungarian, _ = mean_best_overlap(pred, target, matching="hungarian")
    assert float(overlap[0]) == pytest.approx(0.5)
    assert float(hungarian[0]) == pytest.approx(0.25)


def test_video_metrics_penalise_a_slot_switch_that_image_metrics_do_not():
    target = torch.zeros(1, 2, 2, 4, dtype=torch.long)
    target[:, :, :, :2] = 1  # the object sits on the left in both frames
    pred = torch.zeros(1, 2, 2, 4, dtype=torch.long)
    pred[0, 0, :, :2] = 1  # frame 0: slot 1 takes it; frame 1: slot 2 does
    pred[0, 1, :, :2] = 2
    masks = one_hot_masks(pred, 3)
    results = {}
    for metric in (ImageARI(), VideoARI(), ImageMBO(), VideoMBO()):
        metric.update(masks, target)
        results[type(metric).__name__] = float(metric.compute())
    assert results == pytest.approx(
        {"ImageARI": 1.0, "VideoARI": 0.0, "ImageMBO": 1.0, "VideoMBO": 0.5}
    )


def test_soft_masks_use_fractional_counts():
    target = torch.tensor([[1, 1]])
    masks = torch.full((1, 2, 2), 0.5)
    scores, _ = mean_best_overlap(masks, target, soft_masks=True)
    assert float(scores[0]) == pytest.approx(0.5)  # per slot: I = 1, union = 2 + 1 - 1
    hard, _ = mean_best_overlap(masks, target)  # argmax: ties to slot 0, which takes both
    assert float(hard[0]) == pytest.approx(1.0)
    generator = torch.Generator().manual_seed(1)
    pred, target = correlated_case(generator, (2, 6, 6), 4)
    masks = one_hot_masks(pred, 4)
    for function in (adjusted_rand_index, mean_best_overlap):
        soft, _ = function(masks, target, soft_masks=True)
        hard, _ = function(masks, target)
        torch.testing.assert_close(soft, hard)


def test_instance_masks_to_ids_and_ignore_overlaps():
    channels = torch.zeros(1, 3, 2, 4, dtype=torch.bool)  # (B, C, H, W), no background channel
    channels[0, 0, :, :2] = True
    channels[0, 1, :, 2:] = True
    channels[0, 2, 0, 1:3] = True  # overlaps both others on two pixels
    ids = instance_masks_to_ids(channels)
    expected = torch.tensor([[[1, OVERLAP_ID, OVERLAP_ID, 2], [1, 1, 2, 2]]])
    torch.testing.assert_close(ids, expected)
    raw = channels[0].permute(1, 2, 0).to(torch.uint8) * 7  # (H, W, I) with category ids
    torch.testing.assert_close(instance_masks_to_ids(raw, channel_dim=-1), expected[0])
    one_hot = torch.cat((~channels[:, :2].any(1, keepdim=True), channels[:, :2]), dim=1)
    torch.testing.assert_close(
        instance_masks_to_ids(one_hot, background_channel=True), torch.tensor([[[1, 1, 2, 2]] * 2])
    )
    pred = torch.tensor([[[0, 1, 1, 1], [0, 0, 1, 1]]])
    with pytest.raises(ValueError, match="ignore_overlaps"):
        adjusted_rand_index(pred, ids)
    scores, _ = mean_best_overlap(pred, ids, ignore_overlaps=True)
    # Overlap pixels leave both target and slots: object 1 = {0, 4, 5} vs slot 0 = {0, 4, 5}.
    assert float(scores[0]) == pytest.approx(1.0)
    scores, _ = adjusted_rand_index(pred, ids, ignore_overlaps=True)
    assert float(scores[0]) == pytest.approx(1.0)


@pytest.mark.parametrize("metric_class", [ImageARI, VideoARI, ImageMBO, VideoMBO])
def test_metrics_merge_across_simulated_ranks(metric_class):
    generator = torch.Generator().manual_seed(2)
    pred, target = correlated_case(generator, (4, 3, 6, 6), 5)
    masks = one_hot_masks(pred, 5)
    whole, rank0, rank1 = metric_class(), metric_class(), metric_class()
    whole.update(masks, target)
    rank0.update(masks[:1], target[:1])
    rank1.update(masks[1:], target[1:])
    rank0.merge_state(rank1)  # what the "sum" reduction does across DDP ranks
    torch.testing.assert_close(rank0.compute(), whole.compute())
    assert rank0.num_samples == whole.num_samples > 0


def test_collection_keeps_metrics_with_equal_first_states_apart():
    # A perfect first batch gives ARI = mBO = 1 in every frame: equal states must not make a
    # MetricCollection fuse the metrics into one compute group.
    perfect = torch.tensor([[[1, 1, 2, 2]]])
    collection = MetricCollection({"ari": ImageARI(), "mbo": ImageMBO()})
    collection.update(perfect, perfect)
    pred, target = torch.tensor([[[0, 0, 0, 0]]]), torch.tensor([[[1, 1, 0, 0]]])
    collection.update(pred, target)  # ARI 1 (one object, one slot), mBO 0.5
    values = {name: float(value) for name, value in collection.compute().items()}
    assert values == pytest.approx({"ari": 1.0, "mbo": 0.75})


def test_metric_inputs_are_checked():
    metric = ImageARI()
    with pytest.raises(ValueError, match=r"target must have shape \(B, T, H, W\)"):
        metric.update(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="target must hold integer instance ids"):
        metric.update(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match=r"pred must have shape \(B, K, H, W\) with H=4"):
        metric.update(torch.zeros(2, 3, 5, 4), torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="pred must be slot masks"):
        metric.update(torch.zeros(2, 4), torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target must have shape \(B, T, H, W\)"):
        VideoMBO().update(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="matching must be"):
        ImageMBO(matching="greedy")
    with pytest.raises(ValueError, match=r"sum to 1 over the slots .* over \[0, 0\]"):
        ImageARI(soft_masks=True).update(torch.zeros(2, 3, 4, 4), torch.ones(2, 4, 4).long())
    logits = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="not logits"):
        mean_best_overlap(logits, torch.ones(2, 4, 4).long(), soft_masks=True)
    ImageMBO(soft_masks=True).update(logits.softmax(1), torch.ones(2, 4, 4).long())
    with pytest.raises(ValueError, match="soft_masks=True needs pred as float masks"):
        ImageARI(soft_masks=True).update(
            torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 4, 4, dtype=torch.long)
        )
