"""Starting slots: fixed learned, learned Gaussian, and carried over from the previous frame."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from post3r_slots._checks import check_at_least_one, check_shape


class FixedLearnedInit(nn.Module):
    """One learned vector per slot, the same for every sample (SlotContrast's choice).

    Deterministic, so slot k means the same thing in every video; the slot count is fixed by
    the parameter shape. `noise_std` > 0 adds Gaussian noise of that std per (sample, slot) in
    training mode only (POST3R's learned embedding + N(0, 0.01²)); eval mode stays deterministic.
    """

    def __init__(
        self,
        num_slots: int,
        slot_dim: int,
        initial_std: float | None = None,
        *,
        noise_std: float = 0.0,
    ) -> None:
        super().__init__()
        check_at_least_one(num_slots, "num_slots")
        check_at_least_one(slot_dim, "slot_dim")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        std = slot_dim**-0.5 if initial_std is None else initial_std
        self.num_slots, self.slot_dim, self.noise_std = num_slots, slot_dim, noise_std
        self.slots = nn.Parameter(torch.randn(num_slots, slot_dim) * std)

    def forward(self, batch_size: int) -> torch.Tensor:
        """Return (batch_size, K, Ds)."""
        slots = self.slots.expand(batch_size, -1, -1)
        if self.training and self.noise_std > 0:
            slots = slots + self.noise_std * torch.randn_like(slots)
        return slots


class GaussianInit(nn.Module):
    """Slots drawn from a learned diagonal Gaussian shared by all slots (VideoSAUR's choice).

    Sampling is reparameterised, so `mean` and `log_std` receive gradients. In training mode
    every call draws fresh samples per (sample, slot). In eval mode `eval_mode="seeded"`
    (default) draws one (K, Ds) noise sample on the CPU from a generator seeded with
    `eval_seed` and gives it to every sample, so a video's starting slots depend neither on its
    position in the batch (a DDP-sharded evaluation equals a single-process one) nor on the
    device; `eval_mode="mean"` returns the mean (all slots identical: slot attention then cannot
    break the symmetry, so use it only with a corrector that can).

    Args:
        num_slots: K, the default slot count (a call may ask for another).
        slot_dim: Ds.
        eval_mode: `"seeded"` or `"mean"`.
        eval_seed: seed of the eval-mode generator.
    """

    def __init__(
        self, num_slots: int, slot_dim: int, *, eval_mode: str = "seeded", eval_seed: int = 0
    ) -> None:
        super().__init__()
        if eval_mode not in ("seeded", "mean"):
            raise ValueError(f"eval_mode must be 'seeded' or 'mean', got {eval_mode!r}")
        check_at_least_one(num_slots, "num_slots")
        check_at_least_one(slot_dim, "slot_dim")
        self.num_slots, self.slot_dim = num_slots, slot_dim
        self.eval_mode, self.eval_seed = eval_mode, eval_seed
        self.mean = nn.Parameter(torch.zeros(slot_dim))
        self.log_std = nn.Parameter(torch.full((slot_dim,), math.log(slot_dim**-0.5)))

    def forward(
        self,
        batch_size: int,
        num_slots: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Return (batch_size, K, Ds); a `generator` overrides the mode's randomness: fresh
        noise per sample and slot, drawn from it on the parameters' device."""
        if num_slots is not None:
            check_at_least_one(num_slots, "num_slots")
        shape = (batch_size, num_slots or self.num_slots, self.slot_dim)
        if generator is None and not self.training:
            if self.eval_mode == "mean":
                return self.mean.expand(shape)
            seeded = torch.Generator().manual_seed(self.eval_seed)
            noise = torch.randn(shape[1:], generator=seeded, dtype=self.mean.dtype)
            noise = noise.to(self.mean.device).expand(shape)
        else:
            noise = torch.randn(
                shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
            )
        return self.mean + self.log_std.exp() * noise


class CarriedSlots(NamedTuple):
    """Starting slots and which samples got fresh ones.

    slots: (B, K, Ds). fresh: (B,) bool, True where the slots came from the base initialiser
    (first frame of a video), False where they were carried over.
    """

    slots: torch.Tensor
    fresh: torch.Tensor


class CarryOverInit(nn.Module):
    """Start from the previous frame's slots; fall back to `base` where a sample is reset.

    This is how a video is processed in chunks or streamed frame by frame: pass the last
    predicted slots of one call as `previous` to the next, and `reset[b] = True` where sample
    b starts a new video.

    Args:
        base: an initialiser called as `base(batch_size) -> (B, K, Ds)`.
        detach: cut the gradient to the carried slots (no backpropagation across calls).
    """

    def __init__(self, base: nn.Module, *, detach: bool = False) -> None:
        super().__init__()
        self.base, self.detach = base, detach

    def forward(
        self,
        batch_size: int,
        previous: torch.Tensor | None = None,
        reset: torch.Tensor | None = None,
    ) -> CarriedSlots:
        """`previous`: (B, K, Ds) or None (every sample fresh); `reset`: (B,) bool or None."""
        if previous is None:
            slots = self.base(batch_size)
            fresh = torch.ones(batch_size, dtype=torch.bool, device=slots.device)
            return CarriedSlots(slots, fresh)
        check_shape(previous, "previous", "B K Ds", B=batch_size)
        if self.detach:
            previous = previous.detach()
        if reset is None:
            fresh = torch.zeros(batch_size, dtype=torch.bool, device=previous.device)
            return CarriedSlots(previous, fresh)
        check_shape(reset, "reset", "B", B=batch_size)
        fresh = reset.to(device=previous.device, dtype=torch.bool)
        initial = self.base(batch_size)
        if initial.shape != previous.shape:
            raise ValueError(
                f"previous has shape {tuple(previous.shape)} but the base initialiser gives "
                f"{tuple(initial.shape)}; carried slots must match the initialiser's (B, K, Ds)"
            )
        return CarriedSlots(torch.where(fresh[:, None, None], initial, previous), fresh)
