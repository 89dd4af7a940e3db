"""Optional dependencies (extras `rope` and `matching`): clear errors when they are missing."""

import sys

import pytest
import torch

from post3r_slots import RecurrentSlotCorrector, mean_best_overlap


def test_recurrent_decoder_without_kernels_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "post3r_kernels", None)  # makes `import` raise ImportError
    with pytest.raises(ImportError, match=r"post3r-slots\[rope\]"):
        RecurrentSlotCorrector(feature_dim=16, slot_dim=16, num_heads=2)


def test_hungarian_matching_without_scipy_names_the_extra(monkeypatch):
    pred = torch.tensor([[[0, 1], [1, 1]]])
    target = torch.tensor([[[1, 1], [2, 2]]])
    overlap, _ = mean_best_overlap(pred, target, matching="overlap")  # needs no scipy
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    with pytest.raises(ImportError, match=r"post3r-slots\[matching\]"):
        mean_best_overlap(pred, target, matching="hungarian")
    assert overlap.shape == (1,)
