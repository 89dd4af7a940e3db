"""The POST3R training engine: a small, plain-PyTorch DDP trainer.

Models implement `TrainModule`; `fit` trains one (one process, or DDP under torchrun /
`launch_local`), `evaluate_checkpoint` measures a checkpoint. See docs/distributed.md for multi-GPU,
multi-node and SLURM use, preemption and exact resume.
"""

from post3r_train.engine.batches import (
    KEY_FIELDS,
    TrainLoaderFactory,
    ValLoaderFactory,
)
from post3r_train.engine.checkpoint import (
    CheckpointError,
    find_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from post3r_train.engine.distributed import DistEnv, init_distributed, shutdown_distributed
from post3r_train.engine.launch import is_worker, launch_local, needs_launch
from post3r_train.engine.loggers import WandbSettings
from post3r_train.engine.module import StateDictMismatchError, TrainModule, move_to_device
from post3r_train.engine.rng import seed_everything
from post3r_train.engine.rundir import RunDir
from post3r_train.engine.trainer import (
    CheckpointWriteError,
    FitResult,
    NonFiniteLossError,
    Trainer,
    fit,
)
from post3r_train.engine.trainer_config import OptimConfig, TrainerConfig
from post3r_train.engine.validation import autocast, evaluate_checkpoint, run_validation

__all__ = [
    "KEY_FIELDS",
    "CheckpointError",
    "CheckpointWriteError",
    "DistEnv",
    "FitResult",
    "NonFiniteLossError",
    "OptimConfig",
    "RunDir",
    "StateDictMismatchError",
    "TrainLoaderFactory",
    "TrainModule",
    "Trainer",
    "TrainerConfig",
    "ValLoaderFactory",
    "WandbSettings",
    "autocast",
    "evaluate_checkpoint",
    "find_checkpoint",
    "fit",
    "init_distributed",
    "is_worker",
    "launch_local",
    "move_to_device",
    "needs_launch",
    "read_checkpoint",
    "run_validation",
    "save_checkpoint",
    "seed_everything",
    "shutdown_distributed",
]
