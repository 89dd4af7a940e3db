"""post3r_backbone: TTT3R, a streaming 3D reconstruction backbone (CUT3R + TTT3R's update).

from post3r_backbone import TTT3R, TTT3RConfig, load_checkpoint

model = load_checkpoint("checkpoints/cut3r_512_dpt_4_64.pth").freeze()
state = model.init_state(batch_size=1)
out, state = model.step(frame, state)  # frame: (B, 3, H, W) in [0, 1]
"""

from post3r_backbone.checkpoint import (
    default_checkpoint_path,
    load_checkpoint,
    read_original_checkpoint,
    read_safetensors,
    save_original_checkpoint,
    save_safetensors,
)
from post3r_backbone.config import (
    PRESETS,
    TTT3RConfig,
    config_from_constructor_string,
    parse_constructor_string,
)
from post3r_backbone.errors import (
    BackboneError,
    TTT3RCheckpointError,
    TTT3RCheckpointNotFoundError,
    TTT3RConfigError,
)
from post3r_backbone.heads import pose_to_matrix, quaternion_to_matrix
from post3r_backbone.model import (
    DEFAULT_OUTPUTS,
    OUTPUT_FIELDS,
    TTT3R,
    BackboneOutput,
    BackboneState,
)

__all__ = [
    "DEFAULT_OUTPUTS",
    "OUTPUT_FIELDS",
    "PRESETS",
    "TTT3R",
    "BackboneError",
    "BackboneOutput",
    "BackboneState",
    "TTT3RCheckpointError",
    "TTT3RCheckpointNotFoundError",
    "TTT3RConfig",
    "TTT3RConfigError",
    "config_from_constructor_string",
    "default_checkpoint_path",
    "load_checkpoint",
    "parse_constructor_string",
    "pose_to_matrix",
    "quaternion_to_matrix",
    "read_original_checkpoint",
    "read_safetensors",
    "save_original_checkpoint",
    "save_safetensors",
]
