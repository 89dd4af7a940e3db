"""Batches: the loader factories the engine takes, and what it reads from batches.

`train_loader(start)` yields this rank's training batches from position `start` (batches
consumed) on; `val_loader()` yields this rank's share of the validation set. Batches are dicts;
besides tensors they may carry sample keys (`KEY_FIELDS`, named when a loss is not finite). A
loader that skips corrupt samples says how many through one channel: its cumulative
`num_skipped` (`CountsSkipped`, as post3r_data's loaders).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from post3r_train.engine.rng import RandomStream

TrainLoaderFactory = Callable[[int], Iterable[dict]]
"""`factory(start)`: this rank's training batches, skipping the first `start` of its stream."""
ValLoaderFactory = Callable[[], Iterable[dict]]
"""`factory()`: this rank's share of the validation set (disjoint across ranks)."""

KEY_FIELDS = ("__key__", "key", "keys", "video_id", "video_ids")
"""Batch entries that name the samples (reported when a loss is not finite)."""


@runtime_checkable
class CountsSkipped(Protocol):
    """A loader that counts the corrupt samples it skipped (since it was made)."""

    @property
    def num_skipped(self) -> int: ...


def skipped_count(loader: object) -> int:
    """The loader's `num_skipped`, or 0 for a loader that does not count."""
    return int(loader.num_skipped or 0) if isinstance(loader, CountsSkipped) else 0


class BatchStream:
    """This rank's training batches from `position` on; a finite loader is restarted there.

    The loader runs under its own random stream (see `RandomStream`), and a loader object with
    a `num_skipped` counter (post3r_data's loaders) has its increments reported by `skipped`.
    """

    def __init__(self, factory: TrainLoaderFactory, position: int, rng: RandomStream) -> None:
        self.factory, self.position, self.rng = factory, position, rng
        self._skipped_before = 0
        self._open()

    def _open(self) -> None:
        with self.rng.active():
            self._loader = self.factory(self.position)
            self._batches: Iterator[dict] = iter(self._loader)
        self._counted = 0

    def next(self) -> dict:
        with self.rng.active():
            batch = next(self._batches, None)
        if batch is None:
            self._skipped_before += self.skipped()
            self._open()
            with self.rng.active():
                batch = next(self._batches, None)
            if batch is None:
                raise RuntimeError(
                    f"the train loader yields no batches from position {self.position} on; "
                    "it must be an endless stream (e.g. WebDataset resampled=True) or restart "
                    "when called with a start position"
                )
        self.position += 1
        return batch

    def skipped(self) -> int:
        """Corrupt samples the loader counted (`num_skipped`) since the last call."""
        total = skipped_count(self._loader)
        new = total - self._counted + self._skipped_before
        self._counted, self._skipped_before = total, 0
        return new


def batch_keys(batch: Any) -> list[Any]:
    """The batch's sample keys (the first of `KEY_FIELDS` present), for error messages."""
    if isinstance(batch, dict):
        for name in KEY_FIELDS:
            if name in batch:
                value = batch[name]
                return list(value) if isinstance(value, list | tuple) else [value]
    return []


def batch_size(batch: Any) -> int:
    """Leading size of the batch's first tensor (for samples per second)."""
    values = batch.values() if isinstance(batch, dict) else [batch]
    for value in values:
        if isinstance(value, Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1
