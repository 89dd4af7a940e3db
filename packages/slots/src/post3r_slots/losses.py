"""Training losses. Each returns a `LossOutput`: the scalar to optimise and its parts
(detached scalars, for logging)."""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from post3r_slots._checks import check_positive, check_shape


class LossOutput(NamedTuple):
    """loss: the scalar to optimise. parts: named detached scalars for logging."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]


def feature_reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> LossOutput:
    """Mean squared error between `reconstruction` and the detached `target`, both
    (B, [T,] N, D), averaged over every element (SlotContrast's feature loss)."""
    sizes = check_shape(reconstruction, "reconstruction", "B [T] N D")
    expected = "B T N D" if "T" in sizes else "B N D"
    check_shape(target, "target", expected, **sizes)
    loss = F.mse_loss(reconstruction, target.detach().to(reconstruction.dtype))
    return LossOutput(loss, {"feature_mse": loss.detach()})


def pointmap_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    *,
    confidence: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    alpha: float = 0.2,
    max_confidence: float = 10.0,
    normalization: str = "clip",
    eps: float = 1e-6,
) -> LossOutput:
    """Confidence-weighted, scale-invariant pointmap loss in DUSt3R's form `C·ℓ − α·log C`.

    `ℓ` is the Euclidean distance between prediction and target after each is divided by its
    own mean point norm over valid pixels, so the loss is invariant to the global scale of
    either. `C` is the confidence clamped to `(0, max_confidence]`: bounded, unlike POST3R's
    raw `1 + exp(x)` weight. When `C` is a frozen backbone output the `−α·log C` term is
    constant; when it is predicted it stops the network from driving `C` to zero.

    Args:
        prediction: (B, [T,] h, w, 3); bilinearly resized to the target's (H, W) if they differ.
        target: (B, [T,] H, W, 3), detached. Non-finite points count as invalid. With no valid
            pixel at all the loss and its parts are NaN (no data must not look like a perfect
            fit): a training loop's non-finite check then skips or stops that step.
        confidence: (B, [T,] H, W), positive; None weighs every pixel 1 with no log term.
            Pixels with a non-positive or non-finite confidence count as invalid.
        valid: (B, [T,] H, W) bool; None: every finite pixel is valid.
        alpha: weight of the `−log C` term.
        max_confidence: upper bound on `C`.
        normalization: `"clip"` (one scale per video: keeps the frames' relative scale),
            `"frame"` (one scale per frame, as POST3R) or `"none"` (not scale-invariant).
        eps: added to the scales before dividing.
    """
    if normalization not in ("clip", "frame", "none"):
        raise ValueError(f"normalization must be 'clip', 'frame' or 'none', got {normalization!r}")
    check_positive(max_confidence, "max_confidence")
    sizes = check_shape(target, "target", "B [T] H W 3")
    video = "T" in sizes
    pixel_dims = "B T H W" if video else "B H W"
    prediction_dims = "B T h w 3" if video else "B h w 3"
    check_shape(prediction, "prediction", prediction_dims, B=sizes["B"], T=sizes.get("T"))
    target = target.detach().to(prediction.dtype)
    prediction = _resize_points(prediction, (sizes["H"], sizes["W"]))
    mask = torch.isfinite(target).all(dim=-1)
    if valid is not None:
        check_shape(valid, "valid", pixel_dims, **sizes)
        mask = mask & valid.bool()
    weight = None
    if confidence is not None:
        check_shape(confidence, "confidence", pixel_dims, **sizes)
        mask = mask & torch.isfinite(confidence) & (confidence > 0)
        weight = torch.where(mask, confidence, 1.0).clamp(max=max_confidence).to(prediction.dtype)
    target = torch.where(mask[..., None], target, 0.0)
    prediction = torch.where(mask[..., None], prediction, 0.0)
    if normalization != "none":
        group_dims = (1, 2, 3) if video and normalization == "clip" else (-2, -1)
        prediction = prediction / _mean_norm(prediction, mask, group_dims, eps)
        target = target / _mean_norm(target, mask, group_dims, eps)
    distance = torch.linalg.vector_norm(prediction - target, dim=-1)
    # No valid pixel: NaN, not 0 (no data is not a perfect fit); decided without a device sync.
    count = torch.where(mask.any(), mask.sum().to(distance.dtype), math.nan)
    regression = (distance * mask).sum() / count
    if weight is None:
        return LossOutput(regression, {"pointmap_distance": regression.detach()})
    weighted = (weight * distance * mask).sum() / count
    log_confidence = -alpha * (weight.log() * mask).sum() / count
    loss = weighted + log_confidence
    parts = {
        "pointmap_distance": regression.detach(),
        "pointmap_weighted": weighted.detach(),
        "pointmap_log_confidence": log_confidence.detach(),
    }
    return LossOutput(loss, parts)


def _resize_points(points: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(points.shape[-3:-1]) == size:
        return points
    flat = points.flatten(0, -4).movedim(-1, 1)  # (·, 3, h, w)
    resized = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return resized.movedim(1, -1).unflatten(0, points.shape[:-3])


def _mean_norm(
    points: torch.Tensor, mask: torch.Tensor, dims: tuple[int, ...], eps: float
) -> torch.Tensor:
    """Mean point norm over the valid pixels of each group, shaped to broadcast over points."""
    norms = torch.linalg.vector_norm(points, dim=-1)
    mean = norms.sum(dim=dims, keepdim=True) / mask.sum(dim=dims, keepdim=True).clamp(min=1)
    return mean[..., None] + eps


def slot_contrastive_loss(
    slots: torch.Tensor,
    *,
    temperature: float = 0.1,
    batch_contrast: bool = True,
    symmetric: bool = False,
    gather_distributed: bool = False,
) -> LossOutput:
    """SlotContrast's slot-slot InfoNCE between consecutive frames.

    Every slot at frame t+1 is an anchor whose positive is the same slot (same video, same k) at
    frame t; the candidates are all slots at frame t: of the whole batch with
    `batch_contrast` (S = B·K candidates), else of the same video (K). Slots are L2-normalised;
    logits are cosine similarities over `temperature`; the loss is the mean cross-entropy over
    all (T-1)·S anchors.

    Args:
        slots: (B, T, K, Ds), T >= 2; use the corrected slots.
        temperature: softmax temperature (SlotContrast: 0.1).
        batch_contrast: draw negatives from the whole batch.
        symmetric: average with the reverse direction (anchors at t, candidates at t+1).
        gather_distributed: with `batch_contrast` under torch.distributed, take candidates
            from every rank (gathered with gradients); every rank needs the same B.
    """
    check_positive(temperature, "temperature")
    sizes = check_shape(slots, "slots", "B T K Ds")
    if sizes["T"] < 2:
        raise ValueError(f"slots must have at least 2 frames (T >= 2), got {tuple(slots.shape)}")
    if gather_distributed and not batch_contrast:
        raise ValueError("gather_distributed=True needs batch_contrast=True")
    slots = F.normalize(slots, dim=-1)
    if batch_contrast:  # one pool of S = B·K slots per frame, ordered b-major
        slots = slots.transpose(0, 1).flatten(1, 2)[None]  # (1, T, S, Ds)
    earlier, later = slots[:, :-1], slots[:, 1:]
    loss, accuracy = _info_nce(later, earlier, temperature, gather_distributed)
    parts = {"contrastive_forward": loss.detach(), "contrastive_accuracy": accuracy}
    if symmetric:
        backward, backward_accuracy = _info_nce(earlier, later, temperature, gather_distributed)
        parts["contrastive_backward"] = backward.detach()
        loss = (loss + backward) / 2
        accuracy = (accuracy + backward_accuracy) / 2
        parts["contrastive_accuracy"] = accuracy
    parts["contrastive"] = loss.detach()
    return LossOutput(loss, parts)


class _ContiguousGradient(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: the gradient slices that
    all_gather's backward exchanges between ranks must be (gloo misreads strided ones)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> torch.Tensor:
        return gradient.contiguous()


def _all_gather_with_gradients(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `tensor`, in rank order, with gradients flowing back to their ranks."""
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of a private API; still correct
        warnings.filterwarnings(
            "ignore", message=".*all_gather is deprecated", category=FutureWarning
        )
        gathered = all_gather(tensor.contiguous())
    return [_ContiguousGradient.apply(part) for part in gathered]


def _info_nce(
    anchors: torch.Tensor, candidates: torch.Tensor, temperature: float, gather: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each anchor (G, T', S, D) against candidates; positive = same index."""
    offset = 0
    if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        offset = dist.get_rank() * candidates.shape[-2]
        candidates = torch.cat(_all_gather_with_gradients(candidates), dim=-2)
    logits = anchors @ candidates.transpose(-2, -1) / temperature  # (G, T', S, S_all)
    num_anchors = anchors.shape[-2]
    labels = torch.arange(num_anchors, device=logits.device) + offset
    labels = labels.expand(logits.shape[:-1])
    loss = F.cross_entropy(logits.flatten(0, -2), labels.flatten())
    accuracy = (logits.argmax(dim=-1) == labels).float().mean()
    return loss, accuracy.detach()
