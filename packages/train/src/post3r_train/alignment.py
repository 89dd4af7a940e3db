"""Alignments that 3D evaluation applies before measuring: Umeyama's Sim(3) between two point
sets, one least-squares scale between pointmaps, and TTT3R's per-sequence depth scale and
scale-and-shift fits. Plain tensors in, float64 results out."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

_IRLS_EPS = 1e-8  # TTT3R's guard against zero residuals in its reweighting


class Similarity(NamedTuple):
    """x -> scale · rotation @ x + translation."""

    scale: Tensor  # () float64
    rotation: Tensor  # (3, 3) float64, det +1
    translation: Tensor  # (3,) float64

    def apply(self, points: Tensor) -> Tensor:
        """Transform points (..., 3)."""
        return self.scale * points.double() @ self.rotation.T + self.translation


def umeyama_sim3(source: Tensor, target: Tensor) -> Similarity:
    """The similarity minimising Σ‖s·R·x_i + t − y_i‖² (Umeyama 1991), as evo's
    `align(correct_scale=True)` computes it for TTT3R's camera metrics.

    Args:
        source: (N, 3) points to move (e.g. predicted camera centres).
        target: (N, 3) points to reach (ground truth).

    Raises ValueError when the source points coincide (no scale can be fitted).
    """
    x, y = source.double(), target.double()
    if x.ndim != 2 or x.shape[-1] != 3 or x.shape != y.shape:
        raise ValueError(f"need two (N, 3) point sets, got {tuple(x.shape)} and {tuple(y.shape)}")
    mean_x, mean_y = x.mean(0), y.mean(0)
    dx, dy = x - mean_x, y - mean_y
    variance = (dx * dx).sum(1).mean()
    if variance <= 1e-12 * max(float((mean_x * mean_x).sum()), 1.0):
        raise ValueError("the source points coincide: no similarity can be fitted")
    covariance = dy.T @ dx / x.shape[0]
    u, d, vh = torch.linalg.svd(covariance)
    sign = torch.ones(3, dtype=torch.float64)
    if torch.det(u) * torch.det(vh) < 0:
        sign[2] = -1.0  # a reflection would fit better: take the best proper rotation
    rotation = u @ torch.diag(sign) @ vh
    scale = (d * sign).sum() / variance
    return Similarity(scale, rotation, mean_y - scale * rotation @ mean_x)


def least_squares_scale(prediction: Tensor, target: Tensor) -> Tensor:
    """s = argmin Σ‖s·p − g‖² over matching points (N, 3): Σ p·g / Σ p·p (float64)."""
    p, g = prediction.double(), target.double()
    return (p * g).sum() / (p * p).sum().clamp(min=1e-24)


def depth_scale(prediction: Tensor, target: Tensor, iterations: int = 10) -> Tensor:
    """TTT3R's `align_with_scale`: a robust (L1) scale by iteratively reweighted least squares.

    Starts from mean(target) / mean(prediction), then `iterations` times solves the weighted
    least squares with weights 1 / (|s·p − g| + 1e-8); the result is clamped to >= 1e-3.
    prediction, target: matching valid depths (N,).
    """
    p, g = prediction.double(), target.double()
    scale = g.mean() / p.mean()
    for _ in range(iterations):
        weights = 1.0 / ((scale * p - g).abs() + _IRLS_EPS)
        scale = (weights * p * g).sum() / (weights * p * p).sum()
    return scale.clamp(min=1e-3)


def depth_scale_and_shift(
    prediction: Tensor, target: Tensor, iterations: int = 100
) -> tuple[Tensor, Tensor]:
    """(s, t) minimising Σ|s·p + t − g| (least absolute deviations): TTT3R's scale-and-shift
    objective (`align_with_lad2`).

    TTT3R runs Adam (lr 1e-4, at most 1000 steps) from s = median(g) / median(p), t = 0, which
    stops short of the optimum whenever the shift needed exceeds ~0.1 depth units; here the same
    objective is solved by iteratively reweighted least squares from the same start, to
    convergence. prediction, target: matching valid depths (N,).
    """
    p, g = prediction.double(), target.double()
    if p.max() - p.min() <= 1e-12 * p.abs().max():  # a constant: only the shift can fit
        return torch.zeros((), dtype=torch.float64), g.median()
    scale = g.median() / p.median()
    shift = torch.zeros((), dtype=torch.float64)
    design = torch.stack((p, torch.ones_like(p)), dim=1)  # (N, 2)
    for _ in range(iterations):
        weights = 1.0 / ((scale * p + shift - g).abs() + _IRLS_EPS)
        normal = design.T @ (weights[:, None] * design)
        scale, shift = torch.linalg.solve(normal, design.T @ (weights * g))
    return scale, shift
