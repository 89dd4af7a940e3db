"""Seeding and random-number-generator state, so a resumed run draws what the original would."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any, cast

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng(cuda: bool = True) -> dict[str, Any]:
    """This process's generator states, as plain types and tensors (loadable weights-only)."""
    kind, keys, pos, has_gauss, gauss = cast(
        tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True)
    )
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if cuda and torch.cuda.is_initialized() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Undo `capture_rng`: the next draws equal those after the capture."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss_np = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss_np))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


class RandomStream:
    """A separate set of CPU generator states (Python, NumPy, torch) to run some code under.

    The engine runs the train loader under one: a DataLoader draws its base seed from torch's
    global generator whenever an iterator starts, and a resumed run starts its iterator at a
    different step than the original did. Inside the stream, such draws never shift the random
    numbers the model draws (dropout, slot initialisation), so a resumed run stays exact.
    """

    def __init__(self, seed: int) -> None:
        outside = capture_rng(cuda=False)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)
        self.state = capture_rng(cuda=False)
        restore_rng(outside)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Draws inside the block come from (and advance) this stream only."""
        outside = capture_rng(cuda=False)
        restore_rng(self.state)
        try:
            yield
        finally:
            self.state = capture_rng(cuda=False)
            restore_rng(outside)
