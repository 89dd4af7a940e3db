"""Peak memory of one training step of a run config, traced with fake tensors (no compute, no GPU).

Method: the model is built on the meta device with random frozen weights (their values do not
change memory), its parameters and a synthetic batch of the config's shapes become fake CPU
tensors (`torch._subclasses.FakeTensorMode`: every op computes output sizes, never values), and
one step runs as the trainer runs it: zero_grad, forward under the config's autocast, backward,
AdamW step. `LiveTensorMemory` watches every tensor storage the step creates and counts its bytes
until Python frees it; the peak of that count, plus the weights and the batch that exist before
the step, is the estimate. It corresponds to `torch.cuda.max_memory_allocated` of the same step,
not to what `nvidia-smi` shows (the CUDA context, ~0.5 GB, and the caching allocator's slack
come on top).

Approximations, all small next to activations: CPU autocast's op lists stand in for CUDA's
(both run matmuls, convolutions and attention in the low precision); attention is whatever
`scaled_dot_product_attention` picks on the CPU (a fused kernel that, like CUDA's flash and
memory-efficient kernels, never stores the full attention matrix); scalars that code reads from
tensors (`.item()`, `if mask.any()`) get stand-in values, which only matters where they change
shapes.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from post3r_train.config import trainer_config


class LiveTensorMemory(TorchDispatchMode):
    """Bytes of the tensor storages alive now and at most, counting every op's outputs.

    Storages that existed before (weights, inputs) are counted once through `add_existing`, so
    that a view of them (a weight's transpose in `linear`) is not counted as a new allocation.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._alive: dict[int, int] = {}

    def add_existing(self, tensors: Iterable[torch.Tensor]) -> None:
        for tensor in tensors:
            self._track(tensor)

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata  # the C++ storage: one per allocation, shared by views
        if key in self._alive:
            return
        nbytes = storage.nbytes()
        self._alive[key] = nbytes
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.live_bytes -= self._alive.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return _stand_in_scalar(args[0])
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._track(item)
        return out


def _stand_in_scalar(tensor: torch.Tensor) -> bool | int | float:
    """A value for `.item()` on a fake tensor: true masks, small positive numbers."""
    if tensor.dtype == torch.bool:
        return True
    return 0.5 if tensor.is_floating_point() else 1


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training step at the config's batch and precision (see the module doc)."""

    peak_bytes: int
    weight_bytes: int
    trainable_bytes: int
    batch_bytes: int
    precision: str

    def describe(self) -> str:
        return (
            f"~{human_bytes(self.peak_bytes)} peak per GPU (weights "
            f"{human_bytes(self.weight_bytes)}, trainable {human_bytes(self.trainable_bytes)}, "
            f"batch {human_bytes(self.batch_bytes)}, precision {self.precision}; fake-tensor "
            "trace of one step, comparable to torch.cuda.max_memory_allocated)"
        )


def human_bytes(nbytes: float) -> str:
    """'8.2 GiB', '35.0 MiB', '512 B'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{int(nbytes)} B"


def _fake_parameters(model: torch.nn.Module) -> None:
    """Swap the meta parameters and buffers of `model` for fake CPU tensors (ties kept)."""
    parameters: dict[int, torch.nn.Parameter] = {}
    buffers: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                if id(param) not in parameters:
                    empty = torch.empty_like(param, device="cpu")
                    parameters[id(param)] = torch.nn.Parameter(empty, param.requires_grad)
                module._parameters[name] = parameters[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                if id(buffer) not in buffers:
                    buffers[id(buffer)] = torch.zeros_like(buffer, device="cpu")
                module._buffers[name] = buffers[id(buffer)]


def _with_random_frozen_weights(cfg: DictConfig) -> DictConfig:
    """A copy of `cfg` whose frozen encoder and teacher get random weights: their values do not
    change memory, and no weight file has to be read."""
    copy = cfg.copy()
    copy.model.encoder.pretrained = False
    copy.model.teacher.random_weights = True
    copy.model.teacher.checkpoint = None
    return copy


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def estimate_training_memory(cfg: DictConfig) -> MemoryEstimate:
    """Peak memory of one training step of `cfg` (forward, backward, AdamW), per GPU."""
    from post3r_train.bench_train import synthetic_batch
    from post3r_train.engine.validation import autocast
    from post3r_train.model import POST3RModel

    cfg = _with_random_frozen_weights(cfg)
    precision = trainer_config(cfg).precision_mode
    with torch.device("meta"):
        model = POST3RModel.from_config(cfg).train()
    with FakeTensorMode(allow_non_fake_inputs=True):
        _fake_parameters(model)
        batch = synthetic_batch(cfg, torch.device("cpu"))
        inputs = [value for value in batch.values() if isinstance(value, torch.Tensor)]
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
        memory = LiveTensorMemory()
        memory.add_existing([*model.parameters(), *model.buffers(), *inputs])
        with memory, contextlib.ExitStack() as stack:
            optimizer.zero_grad(set_to_none=True)
            stack.enter_context(autocast(torch.device("cpu"), precision))
            loss, _ = model.training_step(batch.copy())
            stack.close()  # leave autocast before backward, as the trainer does
            loss.backward()
            optimizer.step()
        return MemoryEstimate(
            peak_bytes=memory.peak_bytes,
            weight_bytes=_nbytes([*model.parameters(), *model.buffers()]),
            trainable_bytes=_nbytes(params),
            batch_bytes=_nbytes(inputs),
            precision=precision,
        )


def main(argv: list[str] | None = None) -> int:
    """`python -m post3r_train.memory_estimate [CONFIG] [key=value ...]`: print the estimate."""
    import sys

    from post3r_train.cli import split_items
    from post3r_train.config import ConfigError, load_config

    try:
        config, overrides = split_items(sys.argv[1:] if argv is None else argv)
        cfg = load_config(config, overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    estimate = estimate_training_memory(cfg)
    print(f"estimated peak: {estimate.peak_bytes} bytes")
    print(estimate.describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
