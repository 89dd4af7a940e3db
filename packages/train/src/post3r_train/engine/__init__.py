"""The POST3R training engine: a small, plain-PyTorch DDP trainer.

Models implement `TrainModule`; `fit` trains one (single process, or DDP under torchrun /
`launch`), `evaluate` measures a checkpoint. See docs/distributed.md for multi-GPU and SLURM.
"""

from post3r_train.engine.config import OptimConfig, TrainerConfig
from post3r_train.engine.module import StateDictMismatchError, TrainModule, move_to_device

__all__ = [
    "OptimConfig",
    "StateDictMismatchError",
    "TrainModule",
    "TrainerConfig",
    "move_to_device",
]
