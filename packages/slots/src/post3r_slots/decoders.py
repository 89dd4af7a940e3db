"""Slot decoders with alpha masks (softmax over slots): features and per-slot 3D pointmaps.

Both take slots (B, K, Ds) or (B, T, K, Ds) (time is folded into the batch) and return the
composite, the masks and every slot's own output, so each slot's mask and geometry can be taken
out on its own.
"""

from __future__ import annotations

from itertools import pairwise
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from post3r_slots._checks import check_finite, check_shape


class FeatureDecoderOutput(NamedTuple):
    """reconstruction: (B, [T,] N, D). masks: (B, [T,] K, N), softmax over slots.
    slot_features: (B, [T,] K, N, D), each slot's own prediction."""

    reconstruction: torch.Tensor
    masks: torch.Tensor
    slot_features: torch.Tensor


class PointmapDecoderOutput(NamedTuple):
    """pointmap: (B, [T,] H, W, 3), the alpha composite. masks: (B, [T,] K, H, W), softmax over
    slots of `alpha_logits` (B, [T,] K, H, W). slot_pointmaps: (B, [T,] K, H, W, 3), each
    slot's own dense XYZ map."""

    pointmap: torch.Tensor
    masks: torch.Tensor
    slot_pointmaps: torch.Tensor
    alpha_logits: torch.Tensor


def _fold_time(tensor: torch.Tensor, video: bool) -> torch.Tensor:
    return tensor.flatten(0, 1) if video else tensor


def _unfold_time(tensor: torch.Tensor, video: bool, batch: int) -> torch.Tensor:
    return tensor.unflatten(0, (batch, -1)) if video else tensor


class MLPDecoder(nn.Module):
    """DINOSAUR's MLP decoder: every slot, plus a learned per-patch position embedding, goes
    through a shared MLP to a feature and an alpha logit per patch; the alphas are softmaxed over
    slots and the features blended with them.

    The first layer is applied to the slot and to the position embedding separately and the
    results are added (the same function), so the (B, K, N, Ds) input is never materialised.

    Args:
        slot_dim: Ds.
        feature_dim: D, the dim of the features to reconstruct.
        num_patches: N.
        hidden_dims: MLP hidden widths (SlotContrast: 1024, 1024, 1024), ReLU between layers.
    """

    def __init__(
        self,
        slot_dim: int,
        feature_dim: int,
        num_patches: int,
        hidden_dims: tuple[int, ...] = (1024, 1024, 1024),
    ) -> None:
        super().__init__()
        self.slot_dim, self.feature_dim, self.num_patches = slot_dim, feature_dim, num_patches
        self.pos_embed = nn.Parameter(torch.randn(num_patches, slot_dim) * slot_dim**-0.5)
        widths = (slot_dim, *hidden_dims, feature_dim + 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(widths))

    def forward(self, slots: torch.Tensor) -> FeatureDecoderOutput:
        """Decode slots (B, [T,] K, Ds)."""
        sizes = check_shape(slots, "slots", "B [T] K Ds", Ds=self.slot_dim)
        check_finite(slots, "slots")
        video = "T" in sizes
        slot_features, alpha = self.decode_patches(_fold_time(slots, video))
        masks = torch.softmax(alpha, dim=1)
        reconstruction = torch.einsum("bknd,bkn->bnd", slot_features, masks)
        batch = sizes["B"]
        return FeatureDecoderOutput(
            *(_unfold_time(t, video, batch) for t in (reconstruction, masks, slot_features))
        )

    def decode_patches(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots (B, K, Ds) -> every slot's features (B, K, N, D) and alpha logits (B, K, N)."""
        first = cast(nn.Linear, self.layers[0])
        hidden = first(slots)[:, :, None, :] + F.linear(self.pos_embed, first.weight)
        for layer in self.layers[1:]:
            # In place: `hidden` is a fresh sum or linear output whose backward does not need it.
            hidden = layer(torch.relu_(hidden))
        features, alpha = hidden.split((self.feature_dim, 1), dim=-1)
        return features, alpha.squeeze(-1)


class PointmapDecoder(nn.Module):
    """Per-slot pointmap decoder: each slot (plus an optional camera-pose embedding) becomes a
    dense XYZ map and an alpha logit at `resolution`; the maps are blended by a softmax over
    slots. All B·K slots are decoded in one batched pass.

    Architecture: a linear map of [slot, pose embedding] to a token broadcast over a coarse
    grid (resolution / 2**num_upsamples) plus a learned position embedding; a 3x3 conv; then
    `num_upsamples` stages of (nearest ×2 upsample, 3x3 conv, GELU), halving the channels down
    to `min_channels`; a 1x1 conv to 4 channels (XYZ, alpha). XYZ is unbounded (regression).

    Args:
        slot_dim: Ds.
        resolution: (H, W) of the output; both divisible by `2**num_upsamples`.
        pose_dim: size of the pose vector P (POST3R passes 12: the top 3x4 of each frame's
            camera-to-world matrix); None: no pose input.
        pose_embed_dim: width of the pose embedding MLP.
        token_dim: channels on the coarse grid.
        num_upsamples: ×2 upsampling stages.
        min_channels: lower bound on the channels of the upsampling stages.
    """

    def __init__(
        self,
        slot_dim: int,
        *,
        resolution: tuple[int, int] = (128, 128),
        pose_dim: int | None = None,
        pose_embed_dim: int = 64,
        token_dim: int = 256,
        num_upsamples: int = 4,
        min_channels: int = 32,
    ) -> None:
        super().__init__()
        height, width = resolution
        factor = 2**num_upsamples
        if height % factor or width % factor:
            raise ValueError(
                f"resolution {tuple(resolution)} must be divisible by 2**num_upsamples={factor}"
            )
        self.slot_dim, self.pose_dim = slot_dim, pose_dim
        self.resolution = (height, width)
        self.pose_embed = _pose_embedding(pose_dim, pose_embed_dim)
        in_dim = slot_dim + (0 if pose_dim is None else pose_embed_dim)
        self.to_token = nn.Linear(in_dim, token_dim)
        self.pos_embed = nn.Parameter(
            torch.randn(token_dim, height // factor, width // factor) * 0.02
        )
        self.stem = nn.Sequential(nn.Conv2d(token_dim, token_dim, 3, padding=1), nn.GELU())
        stages, channels = [], token_dim
        for _ in range(num_upsamples):
            out_channels = max(channels // 2, min_channels)
            stages += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(channels, out_channels, 3, padding=1),
                nn.GELU(),
            ]
            channels = out_channels
        self.upsample = nn.Sequential(*stages)
        self.head = nn.Conv2d(channels, 4, 1)

    def forward(
        self, slots: torch.Tensor, pose: torch.Tensor | None = None
    ) -> PointmapDecoderOutput:
        """Decode slots (B, [T,] K, Ds), with `pose` (B, [T,] P) if built with `pose_dim`."""
        sizes = check_shape(slots, "slots", "B [T] K Ds", Ds=self.slot_dim)
        check_finite(slots, "slots")
        video, batch, num_slots = "T" in sizes, sizes["B"], sizes["K"]
        x = _with_pose(_fold_time(slots, video), pose, self.pose_embed, self.pose_dim, sizes)
        tokens = self.to_token(x.flatten(0, 1))[:, :, None, None] + self.pos_embed
        output = self.head(self.upsample(self.stem(tokens)))  # (B·K, 4, H, W)
        output = output.unflatten(0, (-1, num_slots)).movedim(2, -1)  # (B, K, H, W, 4)
        slot_pointmaps, alpha_logits = output[..., :3], output[..., 3]
        masks = torch.softmax(alpha_logits, dim=1)
        pointmap = torch.einsum("bkhwc,bkhw->bhwc", slot_pointmaps, masks)
        outputs = (pointmap, masks, slot_pointmaps, alpha_logits)
        return PointmapDecoderOutput(*(_unfold_time(t, video, batch) for t in outputs))


class PointmapMLPDecoder(nn.Module):
    """Per-slot pointmap decoder in the MLP decoder's form: each slot (plus an optional
    camera-pose embedding) and each cell's position embedding go through a shared MLP to the
    cell's XYZ and an alpha logit, on the `resolution` grid; the maps are blended by a softmax
    over slots.

    Each cell's alpha is the MLP's own output, so the masks are as sharp as the grid (the
    convolutional `PointmapDecoder` draws its masks from a coarse token grid upsampled), and a
    slot that covers a plane (a floor) predicts it from the position embedding alone.

    Args:
        slot_dim: Ds.
        resolution: (H, W) of the output grid.
        pose_dim: size of the pose vector P; None: no pose input.
        pose_embed_dim: width of the pose embedding MLP.
        hidden_dims: MLP hidden widths, ReLU between layers.
    """

    def __init__(
        self,
        slot_dim: int,
        *,
        resolution: tuple[int, int] = (128, 128),
        pose_dim: int | None = None,
        pose_embed_dim: int = 64,
        hidden_dims: tuple[int, ...] = (256, 256),
    ) -> None:
        super().__init__()
        self.slot_dim, self.pose_dim = slot_dim, pose_dim
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.pose_embed = _pose_embedding(pose_dim, pose_embed_dim)
        in_dim = slot_dim + (0 if pose_dim is None else pose_embed_dim)
        height, width = self.resolution
        self.mlp = MLPDecoder(in_dim, 3, height * width, hidden_dims)

    def forward(
        self, slots: torch.Tensor, pose: torch.Tensor | None = None
    ) -> PointmapDecoderOutput:
        """Decode slots (B, [T,] K, Ds), with `pose` (B, [T,] P) if built with `pose_dim`."""
        sizes = check_shape(slots, "slots", "B [T] K Ds", Ds=self.slot_dim)
        check_finite(slots, "slots")
        video, batch = "T" in sizes, sizes["B"]
        x = _with_pose(_fold_time(slots, video), pose, self.pose_embed, self.pose_dim, sizes)
        slot_points, alpha_logits = self.mlp.decode_patches(x)  # (B, K, N, 3), (B, K, N)
        masks = torch.softmax(alpha_logits, dim=1)
        pointmap = torch.einsum("bknc,bkn->bnc", slot_points, masks)
        grid = self.resolution
        outputs = (
            pointmap.unflatten(1, grid),
            masks.unflatten(2, grid),
            slot_points.unflatten(2, grid),
            alpha_logits.unflatten(2, grid),
        )
        return PointmapDecoderOutput(*(_unfold_time(t, video, batch) for t in outputs))


def _pose_embedding(pose_dim: int | None, width: int) -> nn.Module | None:
    """The pointmap decoders' pose MLP (P -> width -> width), or None without a pose input."""
    if pose_dim is None:
        return None
    return nn.Sequential(nn.Linear(pose_dim, width), nn.ReLU(), nn.Linear(width, width))


def _with_pose(
    slots: torch.Tensor,
    pose: torch.Tensor | None,
    pose_embed: nn.Module | None,
    pose_dim: int | None,
    sizes: dict[str, int],
) -> torch.Tensor:
    """Folded slots (B·T, K, Ds) with each frame's pose embedding appended to every slot."""
    if pose_embed is None:
        if pose is not None:
            raise ValueError("pose was given but this decoder was built with pose_dim=None")
        return slots
    if pose is None:
        raise ValueError(f"pose is required: the decoder has pose_dim={pose_dim}")
    video = "T" in sizes
    pose_dims = "B T P" if video else "B P"
    check_shape(pose, "pose", pose_dims, B=sizes["B"], T=sizes.get("T"), P=pose_dim)
    embedding = pose_embed(_fold_time(pose, video).to(slots.dtype))
    return torch.cat((slots, embedding[:, None].expand(-1, sizes["K"], -1)), dim=-1)
