"""Building a POST3R model from a run config: the `model` and `loss` sections -> built modules.

`build_parts(cfg)` returns the keyword arguments of `POST3RModel(...)`: every module already
built, and the typed loss config. Only modules whose loss weight is non-zero are built, so every
trainable parameter gets a gradient every step and DDP needs no unused-parameter search.
"""

from __future__ import annotations

from typing import TypedDict

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from post3r_slots import (
    FixedLearnedInit,
    GaussianInit,
    MLPDecoder,
    PointmapDecoder,
    PointmapMLPDecoder,
    RecurrentSlotCorrector,
    SlotAttention,
    SlotVideoProcessor,
    TransformerPredictor,
)
from post3r_train.config import LossConfig, frame_size
from post3r_train.encoders import DinoV2Encoder, PatchEncoder
from post3r_train.teacher import CachedTeacher, GroundTruthTargets, TTT3RTeacher

POSE_DIM = 12  # the top 3x4 of camera-to-world, see teacher.pose_features


class ModelParts(TypedDict):
    """What `POST3RModel.__init__` takes (see there for each one's role)."""

    teacher: nn.Module | None
    encoder: nn.Module | None
    input_projection: nn.Module
    processor: SlotVideoProcessor
    feature_decoder: MLPDecoder | None
    pointmap_decoder: PointmapDecoder | PointmapMLPDecoder | None
    image_size: tuple[int, int]
    grid: tuple[int, int]
    loss: LossConfig
    feature_target: str
    pointmap_frame: str
    visualize: bool
    visualize_every: int | None


def build_parts(cfg: DictConfig) -> ModelParts:
    """Every module of the model described by `cfg.model` and `cfg.loss`."""
    m = cfg.model
    loss: LossConfig = OmegaConf.to_object(cfg.loss)  # type: ignore[assignment]
    side = frame_size(cfg)
    image_size = (side, side)
    teacher = build_teacher(m)
    encoder, feature_dim, grid = build_encoder(m, teacher, image_size)
    patch_area = (image_size[0] // grid[0]) * (image_size[1] // grid[1])
    # Built in this order on purpose: each module draws its initial weights from the global RNG,
    # so the order fixes which weights a seed gives (and keeps earlier runs reproducible).
    input_projection = build_input_projection(m, feature_dim)
    processor = build_processor(m, grid)
    feature_decoder = None
    if loss.feature_weight > 0:
        target_dim = feature_dim if m.feature_decoder.target == "encoder" else 3 * patch_area
        feature_decoder = build_feature_decoder(m, target_dim, grid)
    pointmap_decoder = None
    if teacher is not None and loss.pointmap_weight > 0:
        pointmap_decoder = build_pointmap_decoder(m)
    return ModelParts(
        teacher=teacher,
        encoder=encoder,
        input_projection=input_projection,
        processor=processor,
        feature_decoder=feature_decoder,
        pointmap_decoder=pointmap_decoder,
        image_size=image_size,
        grid=grid,
        loss=loss,
        feature_target=m.feature_decoder.target,
        pointmap_frame=m.pointmap_decoder.frame,
        visualize=bool(m.visualize),
        visualize_every=m.visualize_every_n_steps,
    )


def build_teacher(m: DictConfig) -> nn.Module | None:
    """`model.teacher.name`: none, dataset (ground truth from the shards), cached (TTT3R's
    outputs read from the teacher cache) or ttt3r (run online)."""
    t = m.teacher
    if t.name == "none":
        return None
    if t.name == "dataset":
        return GroundTruthTargets()
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


def build_encoder(
    m: DictConfig, teacher: nn.Module | None, image_size: tuple[int, int]
) -> tuple[nn.Module | None, int, tuple[int, int]]:
    """(encoder or None for the teacher's tokens, feature dim, patch grid (h, w))."""
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
    assert isinstance(teacher, TTT3RTeacher)  # config validation guarantees it
    side = teacher.image_size or image_size[0]
    grid = (side // teacher.patch_size, side // teacher.patch_size)
    return None, teacher.dim, grid


def build_input_projection(m: DictConfig, feature_dim: int) -> nn.Module:
    """SlotContrast's LN -> MLP from encoder features to slot space."""
    hidden = m.slots.input_hidden_dim or 2 * feature_dim
    return nn.Sequential(
        nn.LayerNorm(feature_dim),
        nn.Linear(feature_dim, hidden),
        nn.ReLU(),
        nn.Linear(hidden, m.slot_dim),
    )


def build_processor(m: DictConfig, grid: tuple[int, int]) -> SlotVideoProcessor:
    """Initialiser, grouper (the corrector) and predictor, scanned over time."""
    return SlotVideoProcessor(
        build_initializer(m),
        build_grouper(m, grid),
        build_predictor(m),
        detach_between_frames=m.slots.detach_between_frames,
    )


def build_grouper(m: DictConfig, grid: tuple[int, int]) -> nn.Module:
    """`model.slots.grouper`: slot attention, or POST3R's recurrent corrector (its blocks are
    `model.num_iterations`, the reference's key; `grid` gives its patches' RoPE positions)."""
    if m.slots.grouper == "recurrent":
        return RecurrentSlotCorrector(
            m.slot_dim,
            m.slot_dim,
            num_blocks=m.num_iterations,
            num_heads=m.slots.heads,
            grid_size=grid,
            detach_gate=m.slots.detach_gate,
        )
    return SlotAttention(
        m.slot_dim,
        m.slot_dim,
        iterations=m.num_iterations,
        first_frame_iterations=m.slots.first_frame_iterations,
        mlp_hidden_dim=m.slots.mlp_hidden_dim,
        implicit_gradient=m.slots.implicit_gradient,
    )


def build_initializer(m: DictConfig) -> nn.Module:
    if m.slots.initializer == "gaussian":
        return GaussianInit(m.num_slots, m.slot_dim)
    return FixedLearnedInit(m.num_slots, m.slot_dim, noise_std=m.slots.init_noise_std)


def build_predictor(m: DictConfig) -> nn.Module | None:
    if m.slots.predictor == "none":
        return None
    return TransformerPredictor(
        m.slot_dim, num_blocks=m.slots.predictor_blocks, num_heads=m.slots.predictor_heads
    )


def build_feature_decoder(m: DictConfig, target_dim: int, grid: tuple[int, int]) -> MLPDecoder:
    """The MLP decoder to `target_dim` per patch."""
    f = m.feature_decoder
    decoder = MLPDecoder(m.slot_dim, target_dim, grid[0] * grid[1], tuple(f.hidden_dims))
    if f.position_embedding == "fourier":
        fix_fourier_positions(decoder, grid, f.fourier_max_frequency)
    return decoder


def fix_fourier_positions(decoder: MLPDecoder, grid: tuple[int, int], max_frequency: float) -> None:
    """Replace the MLP decoder's learned position embedding by fixed fourier features (rebuilt
    from the config, so neither trained nor checkpointed)."""
    embedding = fourier_positions(grid, decoder.slot_dim, max_frequency)
    with torch.no_grad():
        decoder.pos_embed.copy_(embedding)
    decoder.pos_embed.requires_grad_(False)


def build_pointmap_decoder(m: DictConfig) -> PointmapDecoder | PointmapMLPDecoder:
    """`model.pointmap_decoder.architecture`: the convolutional decoder or the MLP one."""
    pm = m.pointmap_decoder
    resolution = (int(m.decoder_resolution[0]), int(m.decoder_resolution[1]))
    if pm.architecture == "mlp":
        decoder = PointmapMLPDecoder(
            m.slot_dim,
            resolution=resolution,
            pose_dim=POSE_DIM if pm.pose_conditioned else None,
            hidden_dims=tuple(pm.hidden_dims),
        )
        if pm.position_embedding == "fourier":
            fix_fourier_positions(decoder.mlp, resolution, pm.fourier_max_frequency)
        return decoder
    return PointmapDecoder(
        m.slot_dim,
        resolution=tuple(m.decoder_resolution),
        pose_dim=POSE_DIM if pm.pose_conditioned else None,
        token_dim=pm.token_dim,
        num_upsamples=pm.num_upsamples,
        min_channels=pm.min_channels,
    )


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
