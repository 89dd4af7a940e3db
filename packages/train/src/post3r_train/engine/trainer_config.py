"""Trainer and optimiser settings: the `trainer` and `optim` sections of a run config.

Plain dataclasses so OmegaConf can use them as structured configs (unknown keys rejected, types
checked); `validate()` catches values OmegaConf cannot (enums, ranges) with the key's full name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from post3r_train.checks import require

# Accepted spellings (ours and Lightning's) of the three precisions.
PRECISIONS = {
    **{name: "32" for name in ("32", "32-true")},
    **{name: "16" for name in ("16", "16-mixed")},
    **{name: "bf16" for name in ("bf16", "bf16-mixed")},
}
NAN_POLICIES = ("stop", "skip")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
SCHEDULERS = ("exp_decay_with_warmup", "warmup_cosine", "constant")


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule.

    The schedule warms up linearly from 0 to `lr` over `warmup_steps`, then decays to
    `lr * final_lr_factor` at `decay_steps` (default: `trainer.max_steps`) and stays there:
    exponentially (`exp_decay_with_warmup`, the original's schedule: factor e^-5 by default),
    along a half cosine (`warmup_cosine`), or not at all (`constant`).
    """

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "exp_decay_with_warmup"
    warmup_steps: int = 2500
    decay_steps: int | None = None
    final_lr_factor: float = math.exp(-5.0)

    def validate(self, prefix: str = "optim") -> None:
        require(self.lr > 0, f"{prefix}.lr must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, f"{prefix}.weight_decay must be >= 0")
        require(len(self.betas) == 2, f"{prefix}.betas must hold two numbers, got {self.betas}")
        require(
            self.scheduler in SCHEDULERS,
            f"{prefix}.scheduler={self.scheduler!r} is not one of {', '.join(SCHEDULERS)}",
        )
        require(self.warmup_steps >= 0, f"{prefix}.warmup_steps must be >= 0")
        require(
            self.decay_steps is None or self.decay_steps > self.warmup_steps,
            f"{prefix}.decay_steps ({self.decay_steps}) must exceed warmup_steps "
            f"({self.warmup_steps}), or be null to decay until trainer.max_steps",
        )
        require(0 <= self.final_lr_factor <= 1, f"{prefix}.final_lr_factor must be in [0, 1]")


@dataclass
class TrainerConfig:
    """How the engine trains: steps, devices, precision, validation, checkpoints, faults.

    Step counts are optimiser steps; with `accumulate_grad_batches = A` each step consumes A
    batches per process, so the effective batch is `batch_size * A * world_size`.
    """

    max_steps: int = 100_000
    val_check_interval: int = 2500
    log_every_n_steps: int = 50
    checkpoint_every_n_steps: int = 5000
    keep_checkpoints: int = 1
    accelerator: str = "auto"
    devices: int = 1
    precision: str = "32"
    gradient_clip_val: float | None = None
    accumulate_grad_batches: int = 1
    scale_lr_with_world_size: bool = False
    nan_policy: str = "stop"
    max_nan_skips: int = 10
    limit_val_batches: int | None = None
    find_unused_parameters: bool = False
    max_time: str | None = None
    deterministic: bool = False
    # Torch threads of a run on the CPU (null: torch's default, OMP_NUM_THREADS or the cores).
    # The thread count decides the floating-point summation order, so a fixed count makes a
    # seed repeat its figures on any machine of the same CPU type, and a one-thread run does not
    # stall when other jobs take a core (a multi-threaded step waits for its slowest thread).
    cpu_threads: int | None = None
    # A CPU run keeps freed memory for reuse instead of returning large blocks to the OS and
    # page-faulting them in again every step (post3r_backbone/allocator.py; glibc only).
    cpu_keep_freed_memory: bool = True
    matmul_precision: str = "high"
    progress_bar: bool = True
    dist_timeout_s: int = 1800

    def validate(self, prefix: str = "trainer") -> None:
        for name in ("max_steps", "val_check_interval", "log_every_n_steps", "devices"):
            require(getattr(self, name) >= 1, f"{prefix}.{name} must be >= 1")
        require(
            self.checkpoint_every_n_steps >= 1,
            f"{prefix}.checkpoint_every_n_steps must be >= 1",
        )
        require(self.accumulate_grad_batches >= 1, f"{prefix}.accumulate_grad_batches must be >= 1")
        require(
            self.keep_checkpoints >= 1 or self.keep_checkpoints == -1,
            f"{prefix}.keep_checkpoints must be >= 1, or -1 to keep every step=*.ckpt",
        )
        require(
            str(self.precision) in PRECISIONS,
            f"{prefix}.precision={self.precision!r} is not one of 32, 16, bf16",
        )
        require(
            self.nan_policy in NAN_POLICIES,
            f"{prefix}.nan_policy={self.nan_policy!r} is not one of {', '.join(NAN_POLICIES)}",
        )
        require(self.max_nan_skips >= 0, f"{prefix}.max_nan_skips must be >= 0")
        require(
            self.accelerator in ACCELERATORS,
            f"{prefix}.accelerator={self.accelerator!r} is not one of {', '.join(ACCELERATORS)}",
        )
        require(
            self.gradient_clip_val is None or self.gradient_clip_val > 0,
            f"{prefix}.gradient_clip_val must be > 0, or null for no clipping",
        )
        require(
            self.limit_val_batches is None or self.limit_val_batches >= 1,
            f"{prefix}.limit_val_batches must be >= 1, or null for the whole validation set",
        )
        require(
            self.cpu_threads is None or self.cpu_threads >= 1,
            f"{prefix}.cpu_threads must be >= 1, or null for torch's default",
        )
        require(
            self.matmul_precision in ("highest", "high", "medium"),
            f"{prefix}.matmul_precision must be highest, high or medium",
        )
        if self.max_time is not None:
            parse_duration(self.max_time)

    @property
    def precision_mode(self) -> str:
        """'32', '16' or 'bf16', whatever alias the config used."""
        return PRECISIONS[str(self.precision)]

    @property
    def max_time_s(self) -> float | None:
        return None if self.max_time is None else parse_duration(self.max_time)


def parse_duration(text: str) -> float:
    """Seconds in `DD:HH:MM:SS` (leading fields optional: `HH:MM:SS`, `MM:SS`)."""
    require(
        re.fullmatch(r"\d+(:\d+){0,3}", str(text)) is not None,
        f"trainer.max_time={text!r} is not DD:HH:MM:SS (e.g. 00:23:30:00)",
    )
    seconds = 0
    for part, unit in zip(reversed(str(text).split(":")), (1, 60, 3600, 86400), strict=False):
        seconds += int(part) * unit
    return float(seconds)
