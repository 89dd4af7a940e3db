"""Prediction heads: self/world pointmaps with confidence, RGB and the camera pose.

Both heads read the decoder's hook layers `[encoder, dec[L/2], dec[3L/4], dec[L]]` (the last one
with the pose token first), run in float32 with autocast off, and return raw-activated outputs:

* points: `xyz / |xyz| * expm1(|xyz|)` ("exp" depth mode), channels-last (B, H, W, 3);
* confidence: `vmin + exp(c)` ("exp" conf mode), (B, H, W);
* rgb: `sigmoid(x)` squeezed into (1e-6, 1 - 1e-6), i.e. in [0, 1] like the input frames;
* pose: (B, 7) = `[tx, ty, tz, qw, qx, qy, qz]`, camera-to-world, quaternion real part first,
  unit norm, sign chosen so that `qw >= 0`.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from post3r_backbone.config import TTT3RConfig
from post3r_backbone.dpt import DPTAdapter
from post3r_backbone.layers import ConditionModulationBlock, Mlp, autocast_off

RGB_EPS = 1e-6


def activate_points(xyz: Tensor, mode: tuple) -> Tensor:
    """Map raw (..., 3) head outputs to 3D points; the direction is kept, the norm is reshaped."""
    name = mode[0]
    if name == "linear":
        return xyz
    distance = xyz.norm(dim=-1, keepdim=True)
    direction = xyz / distance.clip(min=1e-8)
    return direction * (torch.expm1(distance) if name == "exp" else distance.square())


def activate_confidence(raw: Tensor, mode: tuple) -> Tensor:
    name, low, high = mode
    if name == "exp":
        return low + raw.exp().clip(max=high - low)
    return (high - low) * torch.sigmoid(raw) + low


def activate_pose(raw: Tensor, mode: tuple) -> Tensor:
    """(B, 7) raw pose -> [t (scaled like points), unit quaternion (w, x, y, z) with w >= 0]."""
    translation, quaternion = raw[..., :3], raw[..., 3:7]
    if mode[0] != "linear":
        distance = translation.norm(dim=-1, keepdim=True)
        grow = torch.expm1(distance) if mode[0] == "exp" else distance.square()
        translation = translation * (grow / distance.clip(min=1e-8))
    quaternion = F.normalize(quaternion, p=2, dim=-1)
    quaternion = torch.where(quaternion[..., :1] < 0, -quaternion, quaternion)
    return torch.cat([translation, quaternion], dim=-1)


def activate_rgb(raw: Tensor) -> Tensor:
    return torch.sigmoid(raw) * (1 - 2 * RGB_EPS) + RGB_EPS


def quaternion_to_matrix(quaternion: Tensor) -> Tensor:
    """(..., 4) quaternions (w, x, y, z), any norm -> (..., 3, 3) rotation matrices."""
    w, x, y, z = quaternion.unbind(-1)
    two_s = 2.0 / (quaternion * quaternion).sum(-1)
    rows = (
        1 - two_s * (y * y + z * z), two_s * (x * y - z * w), two_s * (x * z + y * w),
        two_s * (x * y + z * w), 1 - two_s * (x * x + z * z), two_s * (y * z - x * w),
        two_s * (x * z - y * w), two_s * (y * z + x * w), 1 - two_s * (x * x + y * y),
    )  # fmt: skip
    return torch.stack(rows, -1).unflatten(-1, (3, 3))


def pose_to_matrix(pose: Tensor) -> Tensor:
    """(B, 7) `[t, q(w, x, y, z)]` -> (B, 4, 4) homogeneous camera-to-world matrices."""
    matrix = torch.eye(4, dtype=pose.dtype, device=pose.device).repeat(*pose.shape[:-1], 1, 1)
    matrix[..., :3, :3] = quaternion_to_matrix(pose[..., 3:7])
    matrix[..., :3, 3] = pose[..., :3]
    return matrix


def _points_and_confidence(
    raw: Tensor, cfg: TTT3RConfig, positive_z: bool = False
) -> tuple[Tensor, Tensor]:
    """(B, 4, H, W) head map -> points (B, H, W, 3) and confidence (B, H, W)."""
    channels_last = raw.permute(0, 2, 3, 1)
    xyz = channels_last[..., :3]
    if positive_z:  # turn each point so that z >= 0
        xyz = xyz * torch.sign(xyz[..., 2:3])
    return activate_points(xyz, cfg.depth_mode), activate_confidence(
        channels_last[..., 3], cfg.conf_mode
    )


class PoseHead(nn.Module):
    """2-layer MLP on the final pose token: dec_dim -> 4 dec_dim -> 7."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = Mlp(dim, dim * 4, 7)

    def forward(self, token: Tensor) -> Tensor:
        return self.mlp(token)


class _Head(nn.Module):
    """What both heads share: the pose MLP, the pose-modulated world branch and the activations.

    A subclass builds its modules (their order is the original's state-dict order) and says how
    one part ("self", "world" or "rgb") turns the float32 hook layers into a raw (B, C, H, W) map.
    """

    cfg: TTT3RConfig
    pose_head: PoseHead
    flip_self_z = False  # the linear head turns self points so that z >= 0, as the original does

    def _build_pose_path(self, cfg: TTT3RConfig) -> None:
        self.final_transform = nn.ModuleList(
            ConditionModulationBlock(cfg.dec_embed_dim, cfg.dec_num_heads, 4.0, cfg.rope_base)
            for _ in range(2)
        )

    def world_tokens(self, tokens: Tensor, pose_token: Tensor, positions: Tensor) -> Tensor:
        for block in self.final_transform:
            tokens = block(tokens, pose_token, positions)
        return tokens

    def raw_map(self, part: str, layers: list[Tensor], image_size: tuple[int, int]) -> Tensor:
        raise NotImplementedError

    def forward(
        self,
        hooks: list[Tensor],
        positions: Tensor,
        image_size: tuple[int, int],
        wanted: Collection[str],
    ) -> dict[str, Tensor]:
        """Pose always; self/world points and confidences and rgb for the `wanted` parts."""
        pose_token, tokens = hooks[-1][:, 0], hooks[-1][:, 1:]
        out: dict[str, Tensor] = {}
        if "world" in wanted:  # under autocast, like the decoder
            world = self.world_tokens(tokens, pose_token, positions)
        with autocast_off(tokens.device):
            layers = [h.float() for h in (*hooks[:-1], tokens)]
            out["camera_pose"] = activate_pose(
                self.pose_head(pose_token.float()), self.cfg.pose_mode
            )
            if "self" in wanted:
                out["pts3d_self"], out["conf_self"] = _points_and_confidence(
                    self.raw_map("self", layers, image_size), self.cfg, self.flip_self_z
                )
            if "rgb" in wanted:
                raw = self.raw_map("rgb", layers, image_size)
                out["rgb"] = activate_rgb(raw.permute(0, 2, 3, 1))
            if "world" in wanted:
                crossed = [*layers[:-1], world.float()]
                out["pts3d_world"], out["conf_world"] = _points_and_confidence(
                    self.raw_map("world", crossed, image_size), self.cfg
                )
        return out


class DPTHead(_Head):
    """The released model's head (`DPTPts3dPose`): three DPT adapters and the pose MLP."""

    def __init__(self, cfg: TTT3RConfig) -> None:
        super().__init__()
        self.cfg = cfg
        token_dims = (cfg.enc_embed_dim, cfg.dec_embed_dim, cfg.dec_embed_dim, cfg.dec_embed_dim)

        def adapter(channels: int) -> DPTAdapter:
            return DPTAdapter(
                token_dims, channels, cfg.patch_size, cfg.dpt_layer_dims, cfg.dpt_feature_dim
            )

        self.dpt_self = adapter(4)
        self._build_pose_path(cfg)
        self.dpt_cross = adapter(4)
        if cfg.rgb_head:
            self.dpt_rgb = adapter(3)
        self.pose_head = PoseHead(cfg.dec_embed_dim)

    def raw_map(self, part: str, layers: list[Tensor], image_size: tuple[int, int]) -> Tensor:
        adapter = {"self": "dpt_self", "world": "dpt_cross", "rgb": "dpt_rgb"}[part]
        return getattr(self, adapter)(layers, image_size)


class LinearHead(_Head):
    """The 224 model's head (`LinearPts3dPose`): per-token MLPs unshuffled into p x p pixels."""

    flip_self_z = True

    def __init__(self, cfg: TTT3RConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim, hidden, pixels = (
            cfg.dec_embed_dim,
            int(cfg.mlp_ratio * cfg.dec_embed_dim),
            cfg.patch_size**2,
        )
        self.proj = Mlp(dim, hidden, 4 * pixels)
        if cfg.rgb_head:
            self.rgb_proj = Mlp(dim, hidden, 3 * pixels)
        self.pose_head = PoseHead(dim)
        self._build_pose_path(cfg)
        self.cross_proj = Mlp(dim, hidden, 4 * pixels)

    def raw_map(self, part: str, layers: list[Tensor], image_size: tuple[int, int]) -> Tensor:
        """The last layer's tokens through the part's MLP, each token's p*p pixels unshuffled."""
        mlp = {"self": "proj", "world": "cross_proj", "rgb": "rgb_proj"}[part]
        features = getattr(self, mlp)(layers[-1])
        p = self.cfg.patch_size
        return self.unshuffle(features, (image_size[0] // p, image_size[1] // p), p)

    @staticmethod
    def unshuffle(features: Tensor, grid: tuple[int, int], p: int) -> Tensor:
        """(B, N, C * p * p) per-token pixel blocks -> (B, C, h p, w p), channels_last in memory.

        The same values as `pixel_shuffle` of the (B, C p p, h, w) token map (channel
        `c p^2 + i p + j` of token (y, x) is pixel (y p + i, x p + j) of channel c), moved in
        one copy straight into the channels-last order the activations read.
        """
        blocks = features.unflatten(1, grid).unflatten(-1, (-1, p, p))  # (B, h, w, C, p, p)
        pixels = blocks.permute(0, 1, 4, 2, 5, 3).flatten(3, 4).flatten(1, 2)  # (B, hp, wp, C)
        return pixels.permute(0, 3, 1, 2)


def build_head(cfg: TTT3RConfig) -> nn.Module:
    return DPTHead(cfg) if cfg.head_type == "dpt" else LinearHead(cfg)
