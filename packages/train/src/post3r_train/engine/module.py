"""The contract between the engine and a model: `TrainModule`.

A model subclasses `TrainModule` and implements the steps; the engine does everything else
(devices, precision, DDP, accumulation, clipping, optimiser, schedule, logging, checkpoints).
Frozen weights (a pretrained backbone, DINOv2) are marked with `requires_grad_(False)` and never
reach a checkpoint: the engine saves `trainable_state_dict()` only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
from torch import Tensor, nn

from post3r_train.errors import StateDictMismatchError

BatchT = TypeVar("BatchT")

if TYPE_CHECKING:  # torchmetrics is slow to import; only the model's make_metrics needs it
    from torchmetrics import MetricCollection


class TrainModule(nn.Module):
    """Base class for what the engine trains.

    Batches are dicts (a model may type them as a TypedDict); the engine moves their tensors
    to the device (other values are left alone) and runs the steps under autocast.
    `training_step` runs through DDP's forward, so every trainable parameter must receive a
    gradient each step (or set `trainer.find_unused_parameters=true`).
    """

    def training_step(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar loss (already the weighted sum) and detached scalar parts for logging."""
        raise NotImplementedError(f"{type(self).__name__} must implement training_step")

    def validation_step(self, batch: Any, metrics: MetricCollection) -> Any:
        """Run the model on a validation batch, update `metrics`, return what `visualize`
        takes (the engine only passes it on)."""
        raise NotImplementedError(f"{type(self).__name__} must implement validation_step")

    def make_metrics(self) -> MetricCollection:
        """Fresh validation metrics whose states are sums and counts (they sync over DDP)."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_metrics")

    def visualize(self, batch: Any, outputs: Any, directory: Path, step: int | None) -> None:
        """Write images/videos/point clouds for one validation batch into `directory`.

        Called on rank 0 for the first validation batch of every validation, with the training
        step it belongs to (None outside training: an evaluation). `directory` may not exist:
        a module that writes creates it (one that writes nothing leaves no empty folder).
        Default: nothing.
        """

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Trainable parameters plus the buffers of modules that are not frozen.

        A module is frozen when it has parameters and none of them requires a gradient; its
        parameters and buffers (and those of its children) are left out.
        """
        frozen = _frozen_module_names(self)
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        buffers = {name for name, _ in self.named_buffers()}
        return {
            name: tensor
            for name, tensor in self.state_dict().items()
            if name in trainable or (name in buffers and not _under(name, frozen))
        }

    def load_trainable_state_dict(self, state: Mapping[str, Tensor], source: str = "") -> None:
        """Load weights saved by `trainable_state_dict`, strictly (see `check_state_dict`)."""
        check_state_dict(self.trainable_state_dict(), state, source or type(self).__name__)
        self.load_state_dict(dict(state), strict=False)


def check_state_dict(
    expected: Mapping[str, Tensor], given: Mapping[str, Tensor], source: str
) -> None:
    """Raise `StateDictMismatchError` listing missing, unexpected and mis-shaped keys."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    misshaped = sorted(
        f"{key}: saved {tuple(given[key].shape)}, model {tuple(expected[key].shape)}"
        for key in set(expected) & set(given)
        if tuple(given[key].shape) != tuple(expected[key].shape)
    )
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{source} does not fit this model (was it saved by a different model or config?)"]
    groups = {"missing": missing, "unexpected": unexpected, "mis-shaped": misshaped}
    for title, keys in groups.items():
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys) - 8} more)" if len(keys) > 8 else "")
            lines.append(f"  {len(keys)} {title} key(s): {shown}")
    raise StateDictMismatchError("\n".join(lines))


def frozen_names(module: TrainModule) -> set[str]:
    """Parameters and buffers outside `trainable_state_dict`: what checkpoints leave out and DDP
    does not broadcast (every rank loads the frozen weights itself)."""
    names = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    return names - set(module.trainable_state_dict())


def _frozen_module_names(module: nn.Module) -> list[str]:
    frozen = []
    for name, child in module.named_modules():
        params = list(child.parameters())
        if name and params and not any(p.requires_grad for p in params):
            frozen.append(name)
    return frozen


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name.startswith(prefix + ".") for prefix in prefixes)


def move_to_device(batch: BatchT, device: torch.device) -> BatchT:
    """Tensors (in dicts, lists and tuples) moved to `device`; other values left alone."""
    return cast(BatchT, _moved(batch, device))


def _moved(batch: object, device: torch.device) -> object:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: _moved(value, device) for key, value in batch.items()}
    if isinstance(batch, list | tuple):
        moved = [_moved(value, device) for value in batch]
        return moved if isinstance(batch, list) else tuple(moved)
    return batch
