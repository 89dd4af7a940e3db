"""POST3R composed: encoder -> slot module -> feature and pointmap decoders, with a 3D teacher.

`POST3RModel.from_config(cfg)` builds it from a run config; it implements the engine's
`TrainModule` (training/validation steps, metrics, visualisation, trainable state only).

Design decisions that fix the reference's defects (reference/post3r.md §9):
- every encoder and the teacher normalise raw [0, 1] frames themselves (D1);
- the TTT3R teacher starts each clip from a fresh state and never resets after frame 0 (D2);
- the pointmap loss uses a clipped confidence with DUSt3R's log term, one scale per clip (D4);
- slot attention has a softmax over slots (real competition) and a learned predictor (D5);
- metrics come from both decoders' masks (D6); all slots of all frames decode in one pass (D7);
- only modules whose loss weight is non-zero are built, so every trainable parameter gets a
  gradient every step and DDP needs no unused-parameter search (D11).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection

from post3r_slots import (
    FixedLearnedInit,
    GaussianInit,
    ImageARI,
    ImageMBO,
    MLPDecoder,
    PointmapDecoder,
    SlotAttention,
    SlotVideoProcessor,
    TransformerPredictor,
    VideoARI,
    VideoMBO,
    patch_masks_to_image,
    pointmap_loss,
    resize_masks,
    slot_contrastive_loss,
)
from post3r_train.encoders import DinoV2Encoder, EncoderOutput, PatchEncoder
from post3r_train.engine import TrainModule
from post3r_train.geometry import object_point_errors, to_first_camera, transform_frames
from post3r_train.teacher import (
    CachedTeacher,
    DatasetTeacher,
    TeacherOutput,
    TTT3RTeacher,
    clip_scale,
    pose_features,
)

POSE_DIM = 12  # the top 3x4 of camera-to-world, see teacher.pose_features


def input_size(cfg: DictConfig) -> tuple[int, int]:
    """(H, W) of the frames the model sees, from the dataset section."""
    size = cfg.dataset.image_size
    if size is None and cfg.dataset.name == "synthetic":
        size = cfg.dataset.synthetic.resolution
    if size is None:
        raise ValueError("set dataset.image_size: the model needs the frame size to build")
    return (int(size), int(size))


class POST3RModel(TrainModule):
    """The trainable slot model plus its frozen parts (DINOv2, TTT3R), built from config."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        m, self.loss_cfg = cfg.model, cfg.loss
        self.image_size = input_size(cfg)
        self.num_slots = m.num_slots
        self.visualize_enabled = bool(m.visualize)
        self.visualize_every = m.visualize_every_n_steps
        self.feature_target = m.feature_decoder.target
        self.teacher = _build_teacher(m)
        self.encoder, feature_dim, self.grid = _build_encoder(m, self.teacher, self.image_size)
        num_patches = self.grid[0] * self.grid[1]
        slot_dim = m.slot_dim
        hidden = m.slots.input_hidden_dim or 2 * feature_dim
        self.input_projection = nn.Sequential(  # SlotContrast's LN -> MLP -> slot space
            nn.LayerNorm(feature_dim),
            nn.Linear(feature_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, slot_dim),
        )
        self.processor = SlotVideoProcessor(
            _build_initializer(m),
            SlotAttention(
                slot_dim,
                slot_dim,
                iterations=m.num_iterations,
                first_frame_iterations=m.slots.first_frame_iterations,
                mlp_hidden_dim=m.slots.mlp_hidden_dim,
                implicit_gradient=m.slots.implicit_gradient,
            ),
            _build_predictor(m),
        )
        self.feature_decoder = None
        if self.loss_cfg.feature_weight > 0:
            target_dim = feature_dim if self.feature_target == "encoder" else 3 * self.patch_area
            self.feature_decoder = MLPDecoder(
                slot_dim, target_dim, num_patches, tuple(m.feature_decoder.hidden_dims)
            )
            if m.feature_decoder.position_embedding == "fourier":
                embedding = fourier_positions(
                    self.grid, slot_dim, m.feature_decoder.fourier_max_frequency
                )
                with torch.no_grad():
                    self.feature_decoder.pos_embed.copy_(embedding)
                self.feature_decoder.pos_embed.requires_grad_(False)  # fixed, rebuilt from config
        self.pointmap_decoder = None
        self.pointmap_frame = m.pointmap_decoder.frame
        if self.teacher is not None and self.loss_cfg.pointmap_weight > 0:
            pm = m.pointmap_decoder
            self.pointmap_decoder = PointmapDecoder(
                slot_dim,
                resolution=tuple(m.decoder_resolution),
                pose_dim=POSE_DIM if pm.pose_conditioned else None,
                token_dim=pm.token_dim,
                num_upsamples=pm.num_upsamples,
                min_channels=pm.min_channels,
            )

    @classmethod
    def from_config(cls, cfg: DictConfig) -> POST3RModel:
        return cls(cfg)

    @property
    def patch_area(self) -> int:
        return (self.image_size[0] // self.grid[0]) * (self.image_size[1] // self.grid[1])

    # ------------------------------------------------------------------------------------
    # Forward

    def forward(
        self,
        batch: dict,
        *,
        previous_slots: Tensor | None = None,
        teacher_state: Any = None,
        targets: bool = True,
    ) -> dict[str, Any]:
        """Run the model on `batch["frames"]` (B, T, 3, H, W) in [0, 1].

        Returns a dict: slots and predicted_slots (B, T, K, Ds), attention_masks (B, T, K, N);
        with the feature decoder feature_reconstruction, feature_target (B, T, N, D) and
        feature_masks (B, T, K, N); with the pointmap decoder pointmap (B, T, h, w, 3),
        pointmap_masks (B, T, K, h, w), slot_pointmaps (B, T, K, h, w, 3) and (with `targets`)
        the teacher's targets resized to (h, w).

        To stream a long video in clips, pass the previous clip's `predicted_slots[:, -1]` as
        `previous_slots` and its `teacher_state`. `targets=False` (inference) needs no ground
        truth: without a TTT3R teacher the pointmap decoder then assumes a static camera.
        """
        frames = _check_batch(batch, self.image_size)
        teacher = self._teacher(batch, teacher_state, targets)
        encoded = self._encode(frames, teacher)
        video = self.processor(
            self.input_projection(encoded.features), previous_slots=previous_slots
        )
        out: dict[str, Any] = {
            "slots": video.slots,
            "predicted_slots": video.predicted,
            "attention_masks": video.masks,
            "teacher_state": None if teacher is None else teacher.state,
        }
        if self.feature_decoder is not None:
            decoded = self.feature_decoder(video.slots)
            out["feature_reconstruction"] = decoded.reconstruction
            out["feature_masks"] = decoded.masks
            out["feature_target"] = self._feature_target(frames, encoded)
        if self.pointmap_decoder is not None and teacher is not None:
            out.update(self._decode_points(video.slots, teacher))
        return out

    def _teacher(self, batch: dict, state: Any, targets: bool) -> TeacherOutput | None:
        if self.teacher is None:
            return None
        if isinstance(self.teacher, (DatasetTeacher, CachedTeacher)) and not targets:
            frames = batch["frames"]
            eye = torch.eye(4, device=frames.device).expand(*frames.shape[:2], 4, 4)
            return TeacherOutput(None, None, eye)
        out = self.teacher(batch, state)
        return to_first_camera(out) if state is None else out  # a stream keeps its first frame

    def _encode(self, frames: Tensor, teacher: TeacherOutput | None) -> EncoderOutput:
        if self.encoder is not None:
            return self.encoder(frames)
        assert teacher is not None and teacher.tokens is not None and teacher.grid is not None
        return EncoderOutput(teacher.tokens, teacher.grid)

    def _feature_target(self, frames: Tensor, encoded: EncoderOutput) -> Tensor:
        if self.feature_target == "encoder":
            return encoded.features.detach()
        return rgb_patches(frames, self.grid)

    def _decode_points(self, slots: Tensor, teacher: TeacherOutput) -> dict[str, Tensor]:
        """Per-slot pointmaps. With `model.pointmap_decoder.frame=camera` the decoder predicts
        each frame's points in that frame's camera (what a slot sees) and the teacher's poses
        carry them into the clip's first-camera frame; with `world` it predicts that frame
        directly (the reference's choice, pose-conditioned)."""
        assert self.pointmap_decoder is not None
        size = self.pointmap_decoder.resolution
        poses = teacher.camera_to_world.to(slots.dtype)
        out: dict[str, Tensor] = {}
        target = None
        if teacher.pointmap is not None:
            target = _resize_nearest(teacher.pointmap.movedim(-1, 2), size).movedim(2, -1)
            if self.pointmap_frame == "camera":
                target = transform_frames(target, torch.linalg.inv(poses.double()).to(poses.dtype))
            out["pointmap_target"] = target
            if teacher.confidence is not None:
                confidence = _resize_nearest(teacher.confidence[:, :, None], size)[:, :, 0]
                out["pointmap_confidence"] = confidence
        scale = clip_scale(target) if target is not None else slots.new_ones(slots.shape[0])
        pose = None
        if self.pointmap_decoder.pose_dim is not None:
            pose = pose_features(poses, scale).to(slots.dtype)
        decoded = self.pointmap_decoder(slots, pose)
        out["pointmap_prediction"] = decoded.pointmap
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
        out.update(
            pointmap=composite,
            pointmap_masks=decoded.masks,
            slot_pointmaps=per_slot,
            pointmap_scale=scale,
        )
        return out

    # ------------------------------------------------------------------------------------
    # Losses

    def losses(self, out: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted total and every term on its own (detached), named for logging."""
        cfg = self.loss_cfg
        total = out["slots"].new_zeros(())
        parts: dict[str, Tensor] = {}
        if self.feature_decoder is not None:
            target = out["feature_target"].to(out["feature_reconstruction"].dtype)
            feature = F.mse_loss(out["feature_reconstruction"], target)
            total = total + cfg.feature_weight * feature
            parts["feature"] = feature.detach()
        if "pointmap_target" in out:
            confidence = out.get("pointmap_confidence") if cfg.pointmap_confidence else None
            result = pointmap_loss(
                out["pointmap_prediction"].float(),
                out["pointmap_target"].float(),
                confidence=confidence,
                alpha=cfg.confidence_alpha,
                max_confidence=cfg.max_confidence,
                normalization="clip",
            )
            total = total + cfg.pointmap_weight * result.loss
            parts["pointmap"] = result.loss.detach()
            parts.update(
                {f"pointmap/{k.removeprefix('pointmap_')}": v for k, v in result.parts.items()}
            )
        if cfg.contrastive_weight > 0 and out["slots"].shape[1] > 1:
            result = slot_contrastive_loss(
                out["slots"].float(),
                temperature=cfg.contrastive_temperature,
                gather_distributed=dist.is_available() and dist.is_initialized(),
            )
            total = total + cfg.contrastive_weight * result.loss
            parts["contrastive"] = result.loss.detach()
            parts["contrastive/accuracy"] = result.parts["contrastive_accuracy"]
        return total, parts

    # ------------------------------------------------------------------------------------
    # TrainModule

    def training_step(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        return self.losses(self(batch))

    @torch.no_grad()
    def validation_step(self, batch: dict, metrics: MetricCollection) -> dict[str, Tensor]:
        out = self(batch)
        total, parts = self.losses(out)
        metrics["loss_total"].update(total.detach())
        for name, value in parts.items():
            if f"loss_{name}" in metrics:
                metrics[f"loss_{name}"].update(value)
        segmentations = batch.get("segmentations")
        size = self.image_size
        if segmentations is not None:
            size = tuple(segmentations.shape[-2:])
        masks = self.image_masks(out, size)
        if segmentations is not None:
            for prefix, key in (("", "feature"), ("pointmap_", "pointmap")):
                if key in masks:
                    for name in ("ari", "image_ari", "mbo", "image_mbo"):
                        metrics[f"{prefix}{name}"].update(masks[key], segmentations)
        if "pointmap" in out and "pointmap" in batch and segmentations is not None:
            errors = object_point_errors(out, batch)
            metrics["object_point_error"].update(errors.object_error, errors.object_weight)
            metrics["point_error"].update(errors.scene_error, errors.scene_weight)
        out.update({f"{key}_image_masks": value for key, value in masks.items()})
        return out

    def image_masks(self, out: dict[str, Tensor], size: tuple[int, int]) -> dict[str, Tensor]:
        """Soft slot masks at image resolution (B, T, K, H, W) from each decoder present."""
        masks = {}
        if "feature_masks" in out:
            masks["feature"] = patch_masks_to_image(
                out["feature_masks"].float(), size, grid_size=self.grid
            )
        if "pointmap_masks" in out:
            masks["pointmap"] = resize_masks(out["pointmap_masks"].float(), size)
        return masks

    def make_metrics(self) -> MetricCollection:
        metrics: dict[str, nn.Module] = {}
        decoders = []
        if self.feature_decoder is not None:
            decoders.append("")
        if self.pointmap_decoder is not None:
            decoders.append("pointmap_")
        for prefix in decoders:
            metrics[f"{prefix}ari"] = VideoARI()
            metrics[f"{prefix}image_ari"] = ImageARI()
            metrics[f"{prefix}mbo"] = VideoMBO()
            metrics[f"{prefix}image_mbo"] = ImageMBO()
        terms = ["total"]
        terms += ["feature"] if self.feature_decoder is not None else []
        terms += ["pointmap"] if self.pointmap_decoder is not None else []
        terms += ["contrastive"] if self.loss_cfg.contrastive_weight > 0 else []
        for name in terms:
            metrics[f"loss_{name}"] = MeanMetric()
        if self.pointmap_decoder is not None:
            metrics["object_point_error"] = MeanMetric()
            metrics["point_error"] = MeanMetric()
        # Each decoder has its own instances of the same metric classes: compute groups would
        # fuse instances whose states happen to match after a batch and report one for both.
        return MetricCollection(metrics, compute_groups=False)

    def visualize(self, batch: dict, outputs: dict, directory: Path) -> None:
        """Mask overlays (PNG, GIF) and per-slot point clouds (PLY); with
        `model.visualize_every_n_steps=N` only in the engine's `step=NNNNNN` folders of
        multiples of N."""
        if not self.visualize_enabled:
            return
        step = _step_of(Path(directory))
        if self.visualize_every and step is not None and step % self.visualize_every:
            return
        from post3r_train.visualize import write_validation_visuals

        write_validation_visuals(batch, outputs, Path(directory))


def fourier_positions(grid: tuple[int, int], dim: int, max_frequency: float) -> Tensor:
    """(h·w, dim) fixed embedding of each patch's (y, x) in [-1, 1]: sin and cos at dim/4
    frequencies from 0.5 to `max_frequency` periods across the frame, per axis; scaled so a
    vector has unit norm on average (as the learned embedding's initialisation)."""
    if dim % 4:
        raise ValueError(f"a fourier position embedding needs model.slot_dim % 4 == 0, got {dim}")
    ys, xs = (torch.linspace(-1, 1, n) for n in grid)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    frequencies = torch.linspace(0.5, max_frequency, dim // 4) * torch.pi
    parts = []
    for axis in (yy.flatten(), xx.flatten()):
        angles = axis[:, None] * frequencies
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1) * (2 / dim) ** 0.5


def _step_of(directory: Path) -> int | None:
    name, _, number = directory.name.partition("=")
    return int(number) if name == "step" and number.isdigit() else None


def _check_batch(batch: dict, size: tuple[int, int]) -> Tensor:
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
        frames = frames.float() / 255
        batch["frames"] = frames
    return frames


def rgb_patches(frames: Tensor, grid: tuple[int, int]) -> Tensor:
    """Pixels of each patch as a target vector: (B, T, 3, H, W) -> (B, T, h·w, 3·ph·pw)."""
    height, width = frames.shape[-2:]
    ph, pw = height // grid[0], width // grid[1]
    x = frames.flatten(0, 1)[..., : grid[0] * ph, : grid[1] * pw]
    x = F.unfold(x.float(), kernel_size=(ph, pw), stride=(ph, pw))  # (BT, 3·ph·pw, N)
    return x.transpose(1, 2).unflatten(0, frames.shape[:2])


def _resize_nearest(x: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, T, C, H, W) -> (B, T, C, h, w) by nearest sampling (keeps points on their surface)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    flat = F.interpolate(x.flatten(0, 1).float(), size=tuple(size), mode="nearest-exact")
    return flat.unflatten(0, x.shape[:2])


def _build_teacher(m: DictConfig) -> nn.Module | None:
    t = m.teacher
    if t.name == "none":
        return None
    if t.name == "dataset":
        return DatasetTeacher()
    if t.name == "cached":
        return CachedTeacher()
    return TTT3RTeacher(
        t.checkpoint,
        preset=t.preset,
        random_weights=t.random_weights,
        image_size=t.image_size,
        tokens=m.encoder.name == "ttt3r",
        update_rule=t.update_rule,
    )


def _build_encoder(
    m: DictConfig, teacher: nn.Module | None, image_size: tuple[int, int]
) -> tuple[nn.Module | None, int, tuple[int, int]]:
    e = m.encoder
    if e.name == "patch":
        grid = (image_size[0] // e.patch_size, image_size[1] // e.patch_size)
        return PatchEncoder(e.patch_size, e.hidden_dim), e.hidden_dim, grid
    if e.name == "dinov2":
        encoder = DinoV2Encoder(
            e.timm_model,
            weights=e.weights,
            pretrained=e.pretrained,
            block=e.block,
            image_size=e.image_size,
            timm_kwargs=dict(e.timm_kwargs),
        )
        side = e.image_size or image_size[0]
        patch = encoder.vit.patch_embed.patch_size
        return encoder, encoder.dim, (side // patch[0], side // patch[1])
    assert isinstance(teacher, TTT3RTeacher)
    side = teacher.image_size or image_size[0]
    grid = (side // teacher.patch_size, side // teacher.patch_size)
    return None, teacher.dim, grid


def _build_initializer(m: DictConfig) -> nn.Module:
    if m.slots.initializer == "gaussian":
        return GaussianInit(m.num_slots, m.slot_dim)
    return FixedLearnedInit(m.num_slots, m.slot_dim)


def _build_predictor(m: DictConfig) -> nn.Module | None:
    if m.slots.predictor == "none":
        return None
    return TransformerPredictor(
        m.slot_dim, num_blocks=m.slots.predictor_blocks, num_heads=m.slots.predictor_heads
    )
