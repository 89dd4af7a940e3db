"""Learning-rate schedules: a multiplier of the base rate for each optimiser step."""

from __future__ import annotations

import math

from post3r_train.engine.trainer_config import OptimConfig


def lr_factor(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Linear warm-up from 0, then decay to `final_lr_factor` at `decay_steps` (see OptimConfig).

    `step` counts completed optimiser steps, as `torch.optim.lr_scheduler.LambdaLR` passes it.
    """
    if optim.warmup_steps and step < optim.warmup_steps:
        return step / optim.warmup_steps
    if optim.scheduler == "constant":
        return 1.0
    end = optim.decay_steps or max_steps
    progress = min(max(step - optim.warmup_steps, 0) / max(end - optim.warmup_steps, 1), 1.0)
    final = optim.final_lr_factor
    if optim.scheduler == "exp_decay_with_warmup":
        return math.exp(math.log(max(final, 1e-12)) * progress) if final > 0 else 1.0 - progress
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
