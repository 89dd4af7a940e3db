"""Losses against hand computations, scale invariance, masking, and the DDP-gathered InfoNCE."""

import math
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from post3r_slots import feature_reconstruction_loss, pointmap_loss, slot_contrastive_loss


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_feature_reconstruction_loss_is_mse_with_a_detached_target():
    reconstruction = torch.randn(2, 3, 5, 4, requires_grad=True)
    target = torch.randn(2, 3, 5, 4, requires_grad=True)
    loss, parts = feature_reconstruction_loss(reconstruction, target)
    torch.testing.assert_close(loss, F.mse_loss(reconstruction, target))
    torch.testing.assert_close(parts["feature_mse"], loss.detach())
    loss.backward()
    assert reconstruction.grad is not None and target.grad is None


def hand_contrastive(
    slots: torch.Tensor, temperature: float, batch_contrast: bool
) -> tuple[float, float]:
    """InfoNCE and top-1 accuracy with explicit loops: anchor = slot at t+1, candidates =
    slots at t, positive = the same slot."""
    frames = slots.shape[1]
    slots = F.normalize(slots, dim=-1)
    groups = [slots.transpose(0, 1).flatten(1, 2)] if batch_contrast else list(slots)
    terms, hits = [], []
    for group in groups:  # (T, S, D)
        for t in range(frames - 1):
            for anchor in range(group.shape[1]):
                logits = [
                    float(group[t + 1, anchor] @ group[t, c]) / temperature
                    for c in range(group.shape[1])
                ]
                log_norm = math.log(sum(math.exp(v) for v in logits))
                terms.append(log_norm - logits[anchor])
                hits.append(max(logits) == logits[anchor])
    return sum(terms) / len(terms), sum(hits) / len(hits)


@pytest.mark.parametrize("batch_contrast", [True, False])
def test_contrastive_loss_matches_hand_computation(batch_contrast):
    # Slots that drift a little between frames, so some anchors find their positive.
    slots = torch.randn(2, 1, 4, 8) + 0.8 * torch.randn(2, 3, 4, 8)
    loss, parts = slot_contrastive_loss(slots, temperature=0.2, batch_contrast=batch_contrast)
    expected_loss, expected_accuracy = hand_contrastive(slots, 0.2, batch_contrast)
    assert 0.0 < expected_accuracy < 1.0
    assert float(loss) == pytest.approx(expected_loss, rel=1e-5)
    assert float(parts["contrastive_accuracy"]) == pytest.approx(expected_accuracy)


def test_symmetric_contrastive_loss_averages_both_directions():
    slots = torch.randn(2, 3, 4, 8)
    forward = slot_contrastive_loss(slots).loss
    backward = slot_contrastive_loss(slots.flip(1)).loss  # anchors at t, candidates at t+1
    symmetric = slot_contrastive_loss(slots, symmetric=True)
    torch.testing.assert_close(symmetric.loss, (forward + backward) / 2)
    torch.testing.assert_close(symmetric.parts["contrastive_backward"], backward)


def test_contrastive_loss_is_low_for_persistent_distinct_slots():
    slots = torch.eye(4)[None, None].expand(1, 3, 4, 4)
    loss, parts = slot_contrastive_loss(slots, temperature=0.05)
    assert float(loss) < 1e-6 and float(parts["contrastive_accuracy"]) == 1.0


def test_contrastive_loss_input_errors():
    with pytest.raises(ValueError, match="at least 2 frames"):
        slot_contrastive_loss(torch.randn(2, 1, 3, 4))
    with pytest.raises(ValueError, match=r"slots must have shape \(B, T, K, Ds\)"):
        slot_contrastive_loss(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="temperature must be positive"):
        slot_contrastive_loss(torch.randn(2, 2, 3, 4), temperature=0.0)
    with pytest.raises(ValueError, match="batch_contrast"):
        slot_contrastive_loss(
            torch.randn(2, 2, 3, 4), batch_contrast=False, gather_distributed=True
        )


@pytest.mark.parametrize("normalization", ["clip", "frame"])
def test_pointmap_loss_is_invariant_to_global_scale(normalization):
    prediction, target = torch.randn(2, 3, 8, 8, 3), torch.randn(2, 3, 8, 8, 3)
    confidence = torch.rand(2, 3, 8, 8) * 20 + 1
    kwargs = {"confidence": confidence, "normalization": normalization}
    base = pointmap_loss(prediction, target, **kwargs).loss
    scaled = pointmap_loss(prediction * 7.5, target * 0.01, **kwargs).loss
    torch.testing.assert_close(scaled, base, rtol=1e-4, atol=1e-5)
    unnormalised = pointmap_loss(prediction, target, normalization="none").loss
    assert not torch.allclose(
        pointmap_loss(prediction * 2, target, normalization="none").loss, unnormalised
    )


def test_per_frame_normalisation_ignores_per_frame_scale_and_per_clip_does_not():
    prediction, target = torch.randn(1, 2, 4, 4, 3), torch.randn(1, 2, 4, 4, 3)
    frame_scales = torch.tensor([1.0, 5.0]).view(1, 2, 1, 1, 1)
    for normalization, invariant in (("frame", True), ("clip", False)):
        base = pointmap_loss(prediction, target, normalization=normalization).loss
        rescaled = pointmap_loss(prediction * frame_scales, target, normalization=normalization)
        assert torch.allclose(rescaled.loss, base, atol=1e-5) == invariant


def test_pointmap_loss_ignores_invalid_pixels_and_bounds_confidence():
    prediction, target = torch.randn(2, 6, 6, 3), torch.randn(2, 6, 6, 3)
    valid = torch.rand(2, 6, 6) > 0.3
    base = pointmap_loss(prediction, target, valid=valid).loss
    noisy_target = torch.where(valid[..., None], target, torch.randn_like(target) * 100)
    noisy_target[~valid] = torch.where(torch.rand(()) > 0.5, math.nan, 1e6)
    noisy_prediction = torch.where(valid[..., None], prediction, 1e3)
    torch.testing.assert_close(
        pointmap_loss(noisy_prediction, noisy_target, valid=valid).loss, base
    )
    nan_target = torch.where(valid[..., None], target, math.nan)
    torch.testing.assert_close(pointmap_loss(prediction, nan_target).loss, base)
    # Confidence is clamped to max_confidence; the log term is -alpha * mean log C.
    huge = torch.full((2, 6, 6), 1e9)
    bounded = pointmap_loss(prediction, target, confidence=huge, max_confidence=10.0, alpha=0.5)
    plain = pointmap_loss(prediction, target).loss
    torch.testing.assert_close(bounded.parts["pointmap_weighted"], 10 * plain)
    torch.testing.assert_close(
        bounded.parts["pointmap_log_confidence"], torch.tensor(-0.5 * math.log(10))
    )
    torch.testing.assert_close(bounded.loss, 10 * plain - 0.5 * math.log(10))


def test_pointmap_loss_upsamples_the_prediction_and_sends_gradients_to_it_only():
    prediction = torch.randn(1, 4, 4, 3, requires_grad=True)
    target = torch.randn(1, 8, 8, 3, requires_grad=True)
    upsampled = F.interpolate(prediction.movedim(-1, 1), size=(8, 8), mode="bilinear")
    expected = pointmap_loss(upsampled.movedim(1, -1), target).loss
    loss = pointmap_loss(prediction, target).loss
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert prediction.grad is not None and target.grad is None


def test_pointmap_loss_input_errors():
    target = torch.randn(2, 3, 8, 8, 3)
    with pytest.raises(ValueError, match=r"prediction must have shape \(B, T, h, w, 3\) with B=2"):
        pointmap_loss(torch.randn(1, 3, 4, 4, 3), target)
    with pytest.raises(ValueError, match=r"confidence must have shape \(B, T, H, W\)"):
        pointmap_loss(torch.randn(2, 3, 4, 4, 3), target, confidence=torch.rand(2, 3, 4, 4))
    with pytest.raises(ValueError, match="normalization must be"):
        pointmap_loss(target, target, normalization="global")
    with pytest.raises(ValueError, match=r"target must have shape \(B, T, H, W, 3\)"):
        pointmap_loss(target, target[..., :2])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_GATHER_SCRIPT = """
import os, sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from post3r_slots import slot_contrastive_loss


def worker(rank, port, folder):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        slots = torch.load(os.path.join(folder, "slots.pt"))
        local = slots[rank : rank + 1].clone().requires_grad_(True)
        loss = slot_contrastive_loss(local, gather_distributed=True, symmetric=True).loss
        loss.backward()
        torch.save((loss.detach(), local.grad), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    # fork from this fresh process (no autograd threads yet): the ranks share its imports.
    mp.start_processes(worker, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2, start_method="fork")
"""


def test_gathered_contrastive_loss_over_two_gloo_ranks_matches_one_process(tmp_path):
    slots = torch.randn(2, 3, 4, 8)
    torch.save(slots, tmp_path / "slots.pt")
    script = tmp_path / "gather.py"
    script.write_text(_GATHER_SCRIPT)
    # A fresh interpreter: forking a pytest worker that already ran autograd is unsafe.
    subprocess.run([sys.executable, str(script), str(_free_port()), str(tmp_path)], check=True)
    (loss0, grad0), (loss1, grad1) = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    whole = slots.clone().requires_grad_(True)
    expected = slot_contrastive_loss(whole, symmetric=True).loss
    expected.backward()
    torch.testing.assert_close((loss0 + loss1) / 2, expected.detach())
    # DDP averages gradients over ranks; all_gather's backward sums the candidates' gradients.
    torch.testing.assert_close(torch.cat((grad0, grad1)) / 2, whole.grad)
