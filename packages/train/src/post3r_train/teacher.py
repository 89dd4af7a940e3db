"""3D teachers: where the pointmap targets and camera poses come from.

`GroundTruthTargets` reads ground truth from the batch (synthetic shards;
`model.teacher.name=dataset`). `CachedTeacher` reads the TTT3R outputs that `apps/cache-teacher`
stored once per whole video, delivered by the loader with the clip's frames and crop.
`TTT3RTeacher` runs the frozen TTT3R backbone online over each clip, frame by frame: from a fresh
state at the clip's first frame, or from the `state` a previous clip of the same video left
(streaming inference), under the run's autocast (the backbone keeps its heads and state in
float32 itself). It never resets after the first frame, where the reference reset the state
after frame 0 and so lost the clip's history. The backbone normalises frames to [-1, 1] itself
(frames arrive in [0, 1], and nothing else normalises them); its state-update gate is computed
per sample, so one video in a batch does not steer another's.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from post3r_train.errors import MissingTargetError

log = logging.getLogger("post3r_train")


class TeacherOutput(NamedTuple):
    """pointmap: (B, T, H, W, 3) world points, or None where there are no targets (inference).
    confidence: (B, T, H, W) or None. camera_to_world: (B, T, 4, 4). tokens: (B, T, N, D)
    encoder tokens or None, on the patch grid `grid`."""

    pointmap: Tensor | None
    confidence: Tensor | None
    camera_to_world: Tensor
    tokens: Tensor | None = None
    grid: tuple[int, int] | None = None
    state: Any = None  # the backbone state after the clip (TTT3R), to continue a stream


def _default_checkpoint() -> Path | None:
    """The backbone's default checkpoint when model.teacher.checkpoint is unset:
    $POST3R_BACKBONE_CHECKPOINT if set, else checkpoints/cut3r_512_dpt_4_64.pth if it exists."""
    from post3r_backbone.checkpoint import CHECKPOINT_ENV, default_checkpoint_path

    path = default_checkpoint_path()
    if os.environ.get(CHECKPOINT_ENV) or path.is_file():
        log.info("model.teacher.checkpoint is unset: using %s", path)
        return path
    return None


class GroundTruthTargets(nn.Module):
    """Ground-truth pointmaps and camera-to-world poses from the batch (no confidence): the
    teacher of `model.teacher.name=dataset`."""

    def forward(self, batch: dict, state: Any = None) -> TeacherOutput:
        missing = [key for key in ("pointmap", "camera_to_world") if key not in batch]
        if missing:
            raise MissingTargetError(
                f"model.teacher.name=dataset needs {', '.join(missing)} in every batch, but these "
                f"shards do not have them (keys: {sorted(batch)}); use model.teacher.name=ttt3r "
                "for real video, or model.teacher.name=none"
            )
        frames = batch["frames"]
        pointmap = batch["pointmap"].to(frames.dtype if frames.is_floating_point() else None)
        pose = batch["camera_to_world"].to(pointmap.dtype)
        if pointmap.shape[:2] != frames.shape[:2] or pose.shape[:2] != frames.shape[:2]:
            raise ValueError(
                f"batch pointmap {tuple(pointmap.shape)} / camera_to_world {tuple(pose.shape)} "
                f"do not match frames {tuple(frames.shape)} in (B, T)"
            )
        return TeacherOutput(pointmap, None, pose)


class CachedTeacher(nn.Module):
    """TTT3R outputs cached per whole video (post3r_data.teacher_cache), cropped like the
    frames by the loader: world points (in the video's first camera), confidences and
    camera-to-world poses. The model re-expresses them in the clip's first camera."""

    FIELDS = ("teacher_pointmap", "teacher_confidence", "teacher_camera_to_world")

    def forward(self, batch: dict, state: Any = None) -> TeacherOutput:
        missing = [key for key in self.FIELDS if key not in batch]
        if missing:
            raise MissingTargetError(
                f"model.teacher.name=cached needs {', '.join(missing)} in every batch, which the "
                "loader adds from the teacher cache (model.teacher.cache); this batch has "
                f"{sorted(batch)}. Build the cache with `uv run apps/cache-teacher`, or use "
                "model.teacher.name=ttt3r"
            )
        frames = batch["frames"]
        dtype = frames.dtype if frames.is_floating_point() else torch.float32
        return TeacherOutput(
            batch["teacher_pointmap"].to(dtype),
            batch["teacher_confidence"].to(dtype),
            batch["teacher_camera_to_world"].to(dtype),
        )


class TTT3RTeacher(nn.Module):
    """The frozen TTT3R backbone over each clip.

    Args:
        checkpoint: an original `.pth` or converted `.safetensors` TTT3R checkpoint.
        preset: the architecture used when `random_weights` (no checkpoint).
        random_weights: build `preset` with random weights (tests only; never silently).
        image_size: frames are resized (bilinear) to image_size² before the backbone.
        tokens: also return the encoder tokens (for `model.encoder.name=ttt3r`).
        update_rule: the backbone's state update, "ttt3r" or "cut3r".
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        *,
        preset: str = "ttt3r_512",
        random_weights: bool = False,
        image_size: int | None = 512,
        tokens: bool = False,
        update_rule: str = "ttt3r",
    ) -> None:
        super().__init__()
        from post3r_backbone import TTT3R, TTT3RConfig, load_checkpoint

        if checkpoint is None and not random_weights:
            checkpoint = _default_checkpoint()
        if checkpoint is not None:
            self.backbone = load_checkpoint(checkpoint)  # clear error if missing or wrong
        elif random_weights:
            self.backbone = TTT3R(TTT3RConfig.preset(preset))
        else:
            raise FileNotFoundError(
                "model.teacher.name=ttt3r needs a TTT3R checkpoint: set "
                "model.teacher.checkpoint=PATH or $POST3R_BACKBONE_CHECKPOINT, or put it at "
                "checkpoints/cut3r_512_dpt_4_64.pth (from the CUT3R release, "
                "or its converted .safetensors; see packages/backbone/README.md). "
                "model.teacher.random_weights=true builds untrained weights (tests only)."
            )
        self.backbone.freeze()
        self.backbone.update_rule = update_rule
        self.image_size = image_size
        self.outputs = ["pts3d_world", "conf_world", "camera_to_world"]
        if tokens:
            self.outputs.append("enc_tokens")
        self.dim = self.backbone.config.enc_embed_dim
        self.patch_size = self.backbone.config.patch_size

    def train(self, mode: bool = True) -> TTT3RTeacher:
        return super().train(False)  # frozen: always in eval mode

    @torch.no_grad()
    def forward(self, batch: dict, state: Any = None) -> TeacherOutput:
        """Run the clip `batch["frames"]`; `state` (from a previous clip's output) continues a
        stream instead of starting fresh."""
        frames = batch["frames"]
        batch_size, time = frames.shape[:2]
        if self.image_size is not None and frames.shape[-2:] != (self.image_size,) * 2:
            size = (self.image_size, self.image_size)
            flat = F.interpolate(frames.flatten(0, 1).float(), size=size, mode="bilinear")
            frames = flat.clamp(0, 1).unflatten(0, (batch_size, time))
        # state=None starts fresh at frame 0; a given state continues a stream. Either way the
        # state is never reset after the first frame.
        # The run's autocast applies; the backbone runs its heads and state in float32 itself.
        out, state = self.backbone.forward_video(frames, state=state, outputs=self.outputs)
        assert out.camera_to_world is not None  # in self.outputs, so always computed
        grid = None
        if out.enc_tokens is not None:
            grid = (frames.shape[-2] // self.patch_size, frames.shape[-1] // self.patch_size)
        return TeacherOutput(
            out.pts3d_world, out.conf_world, out.camera_to_world, out.enc_tokens, grid, state
        )


def clip_scale(pointmap: Tensor, valid: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """Mean point norm over each clip's valid pixels: (B, T, H, W, 3) -> (B,)."""
    finite = torch.isfinite(pointmap).all(dim=-1)
    valid = finite if valid is None else finite & valid
    norms = torch.where(valid, torch.linalg.vector_norm(pointmap.nan_to_num(0.0), dim=-1), 0.0)
    return norms.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1) + eps


def pose_features(camera_to_world: Tensor, scale: Tensor) -> Tensor:
    """The decoder's pose input: the top 3x4 of camera-to-world (B, T, 4, 4), translation divided
    by the clip's scale (B,), flattened to (B, T, 12). A matrix avoids quaternion sign flips."""
    rotation = camera_to_world[..., :3, :3]
    translation = camera_to_world[..., :3, 3] / scale[:, None, None]
    return torch.cat((rotation.flatten(-2), translation), dim=-1)
