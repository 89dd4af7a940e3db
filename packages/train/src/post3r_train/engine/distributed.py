"""Process group set-up and the few collectives the engine needs.

Ranks come from torchrun / `launch_local` (RANK, WORLD_SIZE, LOCAL_RANK) or from SLURM when
`srun` starts one task per device (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID). The
backend is gloo on CPU and NCCL on GPU (RCCL on ROCm builds, under the same name). Every helper
here is a no-op in a single process, so the training loop has one code path.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank, world size, device, backend."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_world() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's or SLURM's environment; (0, 0, 1) alone."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"])
    # A multi-task `srun` step (not the batch script itself, whose step has one task).
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"])
        return rank, int(env.get("SLURM_LOCALID", 0)), world
    return 0, 0, 1


def select_device(accelerator: str, local_rank: int) -> torch.device:
    """The device for this process (`trainer.accelerator`: auto, cpu, gpu)."""
    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"trainer.accelerator={accelerator} but no CUDA/ROCm device is visible "
            "(check CUDA_VISIBLE_DEVICES / ROCR_VISIBLE_DEVICES, or use trainer.accelerator=cpu)"
        )
    count = torch.cuda.device_count()
    # One visible device: the scheduler gave this process its own GPU (e.g. SLURM
    # --gpus-per-task=1, or ROCR_VISIBLE_DEVICES=$SLURM_LOCALID on LUMI); otherwise GPU i.
    index = 0 if count == 1 else local_rank
    if index >= count:
        raise RuntimeError(
            f"local rank {local_rank} needs GPU {local_rank} but only {count} are visible: "
            f"start at most {count} processes per node (trainer.devices / --nproc-per-node)"
        )
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_distributed(accelerator: str = "auto", timeout_s: int = 1800) -> DistEnv:
    """Join the process group if this process was launched as one of several; pick its device.

    Safe to call twice (the second call reuses the group). The caller that created the group
    should end with `shutdown_distributed`.
    """
    rank, local_rank, world_size = launched_world()
    device = select_device(accelerator, local_rank)
    if world_size == 1:
        return DistEnv(device=device)
    if dist.is_initialized():
        return DistEnv(rank, local_rank, world_size, device, dist.get_backend())
    _fill_slurm_rendezvous(rank, local_rank, world_size)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    return DistEnv(rank, local_rank, world_size, device, backend, owns_group=True)


def _fill_slurm_rendezvous(rank: int, local_rank: int, world_size: int) -> None:
    """Under plain `srun` (no torchrun) torch's env:// init still needs these variables."""
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError(
            "MASTER_ADDR is not set: under srun export it to the first node of the job, e.g. "
            "`export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1)` "
            "and MASTER_PORT (see scripts/slurm/ and docs/distributed.md)"
        )
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    os.environ.setdefault("WORLD_SIZE", str(world_size))
    os.environ.setdefault("MASTER_PORT", "29500")


def shutdown_distributed(env: DistEnv) -> None:
    """Leave the process group if `init_distributed` created it."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum of `values` over ranks (a copy; the input is left alone)."""
    out = values.detach().clone()
    if env.distributed:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """`obj` from every rank, in rank order."""
    if not env.distributed:
        return [obj]
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, env: DistEnv, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank when `flag` is true on at least one."""
    value = torch.tensor([float(flag)], device=env.device)
    return bool(all_reduce_sum(value, env).item() > 0)


def check_ranks_agree(value: int, what: str, env: DistEnv) -> None:
    """Raise on every rank when ranks hold different `value`s (e.g. the step they are at)."""
    values = all_gather_objects(int(value), env)
    if len(set(values)) > 1:
        raise RuntimeError(f"ranks disagree on {what}: {values} (rank order); refusing to go on")
