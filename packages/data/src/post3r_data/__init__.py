"""post3r_data: YouTube-VIS 2021 conversion, synthetic 3D video and WebDataset streaming.

The public API is listed in packages/data/README.md.
"""

from post3r_data.clips import instance_ids
from post3r_data.errors import CorruptSampleError, CorruptShardError, DataError
from post3r_data.loader import (
    TrainLoader,
    ValLoader,
    make_train_loader,
    make_val_loader,
    probe_fields,
)
from post3r_data.shards import ShardSummary, find_shards, summarize_shards
from post3r_data.synth import SynthConfig, SynthResult, generate_synthetic_dataset

__all__ = [
    "CorruptSampleError",
    "CorruptShardError",
    "DataError",
    "ShardSummary",
    "SynthConfig",
    "SynthResult",
    "TrainLoader",
    "ValLoader",
    "find_shards",
    "generate_synthetic_dataset",
    "instance_ids",
    "make_train_loader",
    "make_val_loader",
    "probe_fields",
    "summarize_shards",
]
