"""The POST3R forward pass: frames -> 3D teacher -> encoder -> slots -> decoders -> ModelOutput.

Read top to bottom: `forward` runs frames (B, T, 3, H, W) in [0, 1] through the frozen 3D
teacher (pointmap targets and camera poses), the encoder (patch features), the slot module (K
slots per frame that persist over time) and the two decoders (features with alpha masks, and
pointmaps with alpha masks). `training_step` hands the output to `losses.py`,
`validation_step` to `metrics.py`. `POST3RModel.from_config(cfg)` builds the modules from a run
config with `build.py`; the model implements the engine's `TrainModule`.

Every encoder and the teacher normalise raw [0, 1] frames themselves, so nothing is normalised
twice. All slots of all frames are decoded in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn
from torchmetrics import MetricCollection

from post3r_backbone.model import check_frame_values
from post3r_slots import MLPDecoder, PointmapDecoder, PointmapMLPDecoder, SlotVideoProcessor
from post3r_train.batch import Batch
from post3r_train.config import LossConfig
from post3r_train.encoders import EncoderOutput
from post3r_train.engine import TrainModule
from post3r_train.geometry import (
    first_camera_transform,
    resize_nearest,
    to_first_camera,
    transform_frames,
)
from post3r_train.losses import total_loss
from post3r_train.metrics import ImageMasks, image_masks, make_metrics, update_metrics
from post3r_train.teacher import (
    CachedTeacher,
    GroundTruthTargets,
    TeacherOutput,
    clip_scale,
    pose_features,
)


class StreamState(NamedTuple):
    """What a video streamed in clips carries from clip to clip besides the slots (the model's
    `teacher_state`): the backbone's state and the world-to-first-camera transform (B, 4, 4) of
    the stream's first clip, so every clip's points and poses share one world frame."""

    backbone: Any
    world_to_first: Tensor


@dataclass
class FeatureOutput:
    """The feature decoder's reconstruction and its target (B, T, N, D), and its alpha masks
    (B, T, K, N) over the N patches."""

    reconstruction: Tensor
    masks: Tensor
    target: Tensor


@dataclass
class PointmapTarget:
    """The teacher's points (B, T, h, w, 3) at the decoder's resolution, in the frame the decoder
    predicts in, and their confidence (B, T, h, w) when the teacher has one (TTT3R)."""

    points: Tensor
    confidence: Tensor | None


@dataclass
class PointmapOutput:
    """The pointmap decoder's output.

    prediction: the composite pointmap (B, T, h, w, 3) in the frame the decoder predicts in
    (what the loss compares with `target`). pointmap and slot_pointmaps (B, T, [K,] h, w, 3):
    the composite and each slot's points in the clip's first-camera frame. masks: (B, T, K, h, w).
    scale: (B,) the target's mean point norm per clip (ones without a target). target: None
    where there is no ground truth (inference). camera_to_world: (B, T, 4, 4) the poses that
    placed the points (the teacher's).
    """

    prediction: Tensor
    pointmap: Tensor
    slot_pointmaps: Tensor
    masks: Tensor
    scale: Tensor
    target: PointmapTarget | None
    camera_to_world: Tensor


@dataclass
class ModelOutput:
    """slots and predicted_slots (B, T, K, Ds), attention_masks (B, T, K, N); the decoders'
    outputs where they are built; teacher_state continues a TTT3R stream in the next clip."""

    slots: Tensor
    predicted_slots: Tensor
    attention_masks: Tensor
    teacher_state: Any
    feature: FeatureOutput | None
    pointmap: PointmapOutput | None
    camera_to_world: Tensor | None = None  # (B, T, 4, 4) the teacher's poses (infer writes them)


@dataclass
class ValidationOutput:
    """What `validation_step` hands to `visualize`: the model's output and its masks at image
    resolution."""

    model: ModelOutput
    image_masks: ImageMasks


class POST3RModel(TrainModule):
    """The trainable slot model plus its frozen parts (DINOv2, TTT3R).

    Args:
        teacher: the 3D targets (`GroundTruthTargets`, `TTT3RTeacher`) or None.
        encoder: frames -> `EncoderOutput`; None uses the TTT3R teacher's encoder tokens.
        input_projection: encoder features -> slot space.
        processor: initialiser, corrector and predictor scanned over the frames.
        feature_decoder, pointmap_decoder: built only where their loss weight is non-zero.
        image_size: (H, W) of the frames; grid: (h, w) of the encoder's patches.
        loss: the loss weights and settings.
        feature_target: `encoder` (its features) or `rgb` (each patch's pixels).
        pointmap_frame: `world` (predict the first-camera frame directly) or `camera` (each
            frame's own camera; the teacher's poses carry the points into the first camera).
        visualize, visualize_every: write visuals at validation, every N steps only.
    """

    def __init__(
        self,
        *,
        teacher: nn.Module | None,
        encoder: nn.Module | None,
        input_projection: nn.Module,
        processor: SlotVideoProcessor,
        feature_decoder: MLPDecoder | None,
        pointmap_decoder: PointmapDecoder | PointmapMLPDecoder | None,
        image_size: tuple[int, int],
        grid: tuple[int, int],
        loss: LossConfig,
        feature_target: str = "encoder",
        pointmap_frame: str = "world",
        visualize: bool = True,
        visualize_every: int | None = None,
    ) -> None:
        super().__init__()
        # Registration order fixes the parameter order (optimiser state in checkpoints).
        self.teacher = teacher
        self.encoder = encoder
        self.input_projection = input_projection
        self.processor = processor
        self.feature_decoder = feature_decoder
        self.pointmap_decoder = pointmap_decoder
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.grid = (int(grid[0]), int(grid[1]))
        self.loss_cfg = loss
        self.feature_target, self.pointmap_frame = feature_target, pointmap_frame
        self.visualize_enabled, self.visualize_every = visualize, visualize_every

    @classmethod
    def from_config(cls, cfg: DictConfig) -> POST3RModel:
        """The model a run config describes (see `build.build_parts`)."""
        from post3r_train.build import build_parts

        return cls(**build_parts(cfg))

    @property
    def num_slots(self) -> int:
        """K, the slots per frame (the initialiser's count)."""
        return int(cast(Any, self.processor.initializer).base.num_slots)

    @property
    def patch_area(self) -> int:
        return (self.image_size[0] // self.grid[0]) * (self.image_size[1] // self.grid[1])

    # ------------------------------------------------------------------------------------
    # Forward

    def forward(
        self,
        batch: Batch,
        *,
        previous_slots: Tensor | None = None,
        teacher_state: Any = None,
        targets: bool = True,
    ) -> ModelOutput:
        """Run the model on `batch["frames"]` (B, T, 3, H, W) in [0, 1] (or uint8).

        To stream a long video in clips, pass the previous clip's `predicted_slots[:, -1]` as
        `previous_slots` and its `teacher_state`. `targets=False` (inference) needs no ground
        truth: without a TTT3R teacher the pointmap decoder then assumes a static camera.
        """
        frames = check_frames(batch, self.image_size)
        converted = cast(Batch, {**batch, "frames": frames})  # the caller's batch stays as it is
        teacher = self._teacher(converted, teacher_state, targets)
        encoded = self._encode(frames, teacher)
        video = self.processor(
            self.input_projection(encoded.features), previous_slots=previous_slots
        )
        feature = None
        if self.feature_decoder is not None:
            decoded = self.feature_decoder(video.slots)
            target = self._feature_target(frames, encoded)
            feature = FeatureOutput(decoded.reconstruction, decoded.masks, target)
        pointmap = None
        if self.pointmap_decoder is not None and teacher is not None:
            pointmap = self._decode_points(video.slots, teacher)
        return ModelOutput(
            slots=video.slots,
            predicted_slots=video.predicted,
            attention_masks=video.masks,
            teacher_state=None if teacher is None else teacher.state,
            feature=feature,
            pointmap=pointmap,
            camera_to_world=None if teacher is None else teacher.camera_to_world,
        )

    def _teacher(self, batch: Batch, state: Any, targets: bool) -> TeacherOutput | None:
        if self.teacher is None:
            return None
        if isinstance(self.teacher, GroundTruthTargets | CachedTeacher) and not targets:
            frames = batch["frames"]
            eye = torch.eye(4, device=frames.device).expand(*frames.shape[:2], 4, 4)
            return TeacherOutput(None, None, eye)
        # A stream stays in its first frame's camera: later clips reuse the first clip's transform.
        stream = state if isinstance(state, StreamState) else None
        out = self.teacher(batch, stream.backbone if stream is not None else state)
        transform = stream.world_to_first if stream is not None else None
        if transform is None:
            transform = first_camera_transform(out.camera_to_world)
        out = to_first_camera(out, transform)
        return out if out.state is None else out._replace(state=StreamState(out.state, transform))

    def _encode(self, frames: Tensor, teacher: TeacherOutput | None) -> EncoderOutput:
        if self.encoder is not None:
            return self.encoder(frames)
        assert teacher is not None and teacher.tokens is not None and teacher.grid is not None
        return EncoderOutput(teacher.tokens, teacher.grid)

    def _feature_target(self, frames: Tensor, encoded: EncoderOutput) -> Tensor:
        if self.feature_target == "encoder":
            return encoded.features.detach()
        return rgb_patches(frames, self.grid)

    def _decode_points(self, slots: Tensor, teacher: TeacherOutput) -> PointmapOutput:
        """Per-slot pointmaps. With `model.pointmap_decoder.frame=camera` the decoder predicts
        each frame's points in that frame's camera (what a slot sees) and the teacher's poses
        carry them into the clip's first-camera frame; with `world` it predicts that frame
        directly (the reference's choice, pose-conditioned)."""
        assert self.pointmap_decoder is not None
        poses = teacher.camera_to_world.to(slots.dtype)
        target = self._pointmap_target(teacher, poses)
        scale = clip_scale(target.points) if target is not None else slots.new_ones(len(slots))
        pose = None
        if self.pointmap_decoder.pose_dim is not None:
            pose = pose_features(poses, scale).to(slots.dtype)
        decoded = self.pointmap_decoder(slots, pose)
        composite, per_slot = decoded.pointmap, decoded.slot_pointmaps
        if self.pointmap_frame == "camera":
            # The loss is scale-invariant: bring the prediction to the target's scale (one
            # factor per clip) before the poses' translations are added.
            factor = torch.ones_like(scale)
            if target is not None:
                factor = (scale / clip_scale(composite.detach().float())).to(composite.dtype)
            factor = factor[:, None, None, None, None]
            composite = transform_frames(factor * composite, poses)
            per_slot = transform_frames(factor[..., None] * per_slot, poses)
        return PointmapOutput(
            prediction=decoded.pointmap,
            pointmap=composite,
            slot_pointmaps=per_slot,
            masks=decoded.masks,
            scale=scale,
            target=target,
            camera_to_world=poses,
        )

    def _pointmap_target(self, teacher: TeacherOutput, poses: Tensor) -> PointmapTarget | None:
        """The teacher's points and confidence at the decoder's resolution and in its frame."""
        assert self.pointmap_decoder is not None
        if teacher.pointmap is None:
            return None
        size = self.pointmap_decoder.resolution
        points = resize_nearest(teacher.pointmap.movedim(-1, 2), size).movedim(2, -1)
        if self.pointmap_frame == "camera":
            points = transform_frames(points, torch.linalg.inv(poses.double()).to(poses.dtype))
        confidence = None
        if teacher.confidence is not None:
            confidence = resize_nearest(teacher.confidence[:, :, None], size)[:, :, 0]
        return PointmapTarget(points, confidence)

    # ------------------------------------------------------------------------------------
    # TrainModule: losses, metrics, visuals

    def losses(self, out: ModelOutput) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted total and every term on its own (detached), named for logging."""
        return total_loss(out, self.loss_cfg)

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        return self.losses(self(batch))

    @torch.no_grad()
    def validation_step(self, batch: Batch, metrics: MetricCollection) -> ValidationOutput:
        out = self(batch)
        total, parts = self.losses(out)
        masks = update_metrics(metrics, out, batch, total, parts, self.image_size, self.grid)
        return ValidationOutput(out, masks)

    def image_masks(self, out: ModelOutput, size: tuple[int, int]) -> ImageMasks:
        """Soft slot masks at image resolution (B, T, K, H, W) from each decoder present."""
        return image_masks(out, size, self.grid)

    def make_metrics(self) -> MetricCollection:
        return make_metrics(
            feature=self.feature_decoder is not None,
            pointmap=self.pointmap_decoder is not None,
            contrastive=self.loss_cfg.contrastive_weight > 0,
        )

    def visualize(
        self, batch: Batch, outputs: ValidationOutput, directory: Path, step: int | None
    ) -> None:
        """Mask overlays (PNG, GIF) and per-slot point clouds (PLY) of the validation at
        training step `step`; with `model.visualize_every_n_steps=N` only at multiples of N
        (an evaluation, step None, always writes them)."""
        if not self.visualize_enabled:
            return
        if self.visualize_every and step is not None and step % self.visualize_every:
            return
        from post3r_train.visualize import write_validation_visuals

        pointmap = outputs.model.pointmap
        target = None if pointmap is None else pointmap.target
        write_validation_visuals(
            batch["frames"],
            outputs.image_masks.by_decoder(),
            Path(directory),
            slot_pointmaps=None if pointmap is None else pointmap.slot_pointmaps,
            pointmap_masks=None if pointmap is None else pointmap.masks,
            segmentations=batch.get("segmentations"),
            camera_to_world=outputs.model.camera_to_world,
            confidence=None if target is None else target.confidence,
        )


def check_frames(batch: Batch, size: tuple[int, int]) -> Tensor:
    """The batch's frames as float in [0, 1], checked against the model's frame size; the
    caller's batch is left as it is."""
    frames = batch.get("frames") if isinstance(batch, dict) else None
    if frames is None:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise KeyError(f"the batch has no 'frames' (keys: {keys})")
    if frames.ndim != 5 or frames.shape[2] != 3:
        raise ValueError(f"batch['frames'] must be (B, T, 3, H, W), got {tuple(frames.shape)}")
    if tuple(frames.shape[-2:]) != tuple(size):
        raise ValueError(
            f"frames are {tuple(frames.shape[-2:])} but the model was built for {tuple(size)} "
            "(dataset.image_size)"
        )
    if frames.dtype == torch.uint8:
        return frames.float() / 255
    _check_frame_values(frames)
    return frames


def _check_frame_values(frames: Tensor) -> None:
    """Float frames in [0, 1] and finite, by the backbone's own rule (one device sync per batch:
    small next to the step's own all-reduce)."""
    fix = (
        " (or uint8 0..255): pass raw frames divided by 255; every encoder normalises for itself "
        "(do not pre-normalise to [-1, 1] or with ImageNet statistics)"
    )
    check_frame_values(frames, "batch['frames']", fix)


def rgb_patches(frames: Tensor, grid: tuple[int, int]) -> Tensor:
    """Pixels of each patch as a target vector: (B, T, 3, H, W) -> (B, T, h·w, 3·ph·pw)."""
    height, width = frames.shape[-2:]
    ph, pw = height // grid[0], width // grid[1]
    x = frames.flatten(0, 1)[..., : grid[0] * ph, : grid[1] * pw]
    x = F.unfold(x.float(), kernel_size=(ph, pw), stride=(ph, pw))  # (BT, 3·ph·pw, N)
    return x.transpose(1, 2).unflatten(0, frames.shape[:2])
