"""TTT3R: the CUT3R streaming 3D reconstruction model with TTT3R's confidence-gated state update.

Per frame: a ViT encoder turns the image into patch tokens; two interleaved decoders let a fixed
set of state tokens and the image tokens (plus a pose query token) read each other; heads turn the
image tokens into pointmaps, confidences, colour and a camera pose; the state tokens and a pose
memory are then updated. The state is the only thing carried between frames, so memory is
constant in sequence length.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from post3r_backbone.config import UPDATE_RULES, TTT3RConfig
from post3r_backbone.errors import TTT3RConfigError
from post3r_backbone.heads import build_head, pose_to_matrix
from post3r_backbone.layers import (
    Block,
    DecoderBlock,
    LayerNorm,
    PatchEmbed,
    autocast_off,
    normal,
)
from post3r_backbone.memory import PoseRetriever
from post3r_kernels import grid_positions, row_major_positions


@dataclass
class BackboneState:
    """What one sequence carries from frame to frame (constant size, whatever the length)."""

    tokens: Tensor  # (B, state_size, dec_embed_dim) float32 state tokens
    memory: Tensor  # (B, local_mem_size, 2 * dec_embed_dim) float32 pose memory
    fresh: Tensor  # (B,) bool: the next frame is the first since init or reset

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def detach(self) -> BackboneState:
        return BackboneState(self.tokens.detach(), self.memory.detach(), self.fresh)

    def to(self, device: torch.device | str) -> BackboneState:
        return BackboneState(self.tokens.to(device), self.memory.to(device), self.fresh.to(device))


@dataclass
class BackboneOutput:
    """Per-frame predictions; a field is None unless it was asked for (see `outputs`).

    Shapes are for one step; `forward_video` inserts a time axis after the batch axis.
    Points and poses are in the coordinate frame of the first camera since the last reset
    (OpenCV axes: x right, y down, z forward), in the model's own (unknown) metric scale.
    """

    pts3d_world: Tensor | None = None  # (B, H, W, 3) points in the first camera's frame
    conf_world: Tensor | None = None  # (B, H, W) confidence >= 1 of pts3d_world
    pts3d_self: Tensor | None = None  # (B, H, W, 3) points in the current camera's frame
    conf_self: Tensor | None = None  # (B, H, W) confidence >= 1 of pts3d_self
    rgb: Tensor | None = None  # (B, H, W, 3) reconstructed colour in [0, 1]
    camera_pose: Tensor | None = None  # (B, 7) camera-to-world [tx, ty, tz, qw, qx, qy, qz]
    camera_to_world: Tensor | None = None  # (B, 4, 4) the same pose as a matrix
    enc_tokens: Tensor | None = None  # (B, N, enc_embed_dim) encoder output (after enc_norm)
    dec_tokens: Tensor | None = None  # (B, N, dec_embed_dim) final image-decoder tokens
    pose_token: Tensor | None = None  # (B, dec_embed_dim) final decoded pose token
    positions: Tensor | None = None  # (B, N, 2) int64 (row, col) patch position of each token
    # Intermediates, for inspection and parity tests.
    pose_query: Tensor | None = None  # (B, 1, dec_embed_dim) pose token fed to the decoder
    dec_hooks: tuple[Tensor, ...] | None = None  # the 4 token layers the heads read
    state_candidate: Tensor | None = None  # (B, S, dec_embed_dim) decoded state before gating
    memory_candidate: Tensor | None = None  # (B, M, 2 dec_embed_dim) pose memory after writing
    gate: Tensor | None = None  # (B, S) TTT3R gate sigmoid(mean state->image logit)


OUTPUT_FIELDS = tuple(f.name for f in dataclasses.fields(BackboneOutput))
DEFAULT_OUTPUTS = (
    "pts3d_world",
    "conf_world",
    "pts3d_self",
    "conf_self",
    "rgb",
    "camera_pose",
    "camera_to_world",
    "enc_tokens",
    "dec_tokens",
    "pose_token",
    "positions",
)
RANGE_SLACK = 0.1  # frames may overshoot [0, 1] this much (resampling); beyond it is an error


def check_frame_values(frames: Tensor, name: str, fix: str) -> None:
    """Float frames, finite and in [0, 1] up to `RANGE_SLACK` (one device sync); the errors name
    the frames `name` and end the range error with `fix`. Meta tensors have no values to check.
    The one frame-value rule for the backbone and for post3r_train's batches."""
    if not frames.is_floating_point():
        raise TypeError(f"{name} must be float in [0, 1] or uint8, got {frames.dtype}")
    if frames.is_meta:
        return
    low, high = torch.stack(torch.aminmax(frames.detach().float())).tolist()
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if low < -RANGE_SLACK or high > 1 + RANGE_SLACK:
        raise ValueError(f"{name} values span [{low:.3g}, {high:.3g}] but must be in [0, 1]{fix}")


_HEAD_PARTS = {
    "pts3d_world": "world",
    "conf_world": "world",
    "pts3d_self": "self",
    "conf_self": "self",
    "rgb": "rgb",
}


class TTT3R(nn.Module):
    """The CUT3R architecture with a pluggable state update rule ("cut3r" or "ttt3r").

    Streaming use::

        state = model.init_state(batch_size)
        for frame in frames:  # (B, 3, H, W) in [0, 1]
            out, state = model.step(frame, state)

    Attribute names follow the original `ARCroco3DStereo` so checkpoints load key for key.
    """

    def __init__(self, config: TTT3RConfig | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else TTT3RConfig()
        self.config = cfg
        enc, dec, base = cfg.enc_embed_dim, cfg.dec_embed_dim, cfg.rope_base
        # Registration order reproduces the original state-dict order.
        self.patch_embed = PatchEmbed(3, enc, cfg.patch_size)
        self.patch_embed_ray_map = PatchEmbed(6, enc, cfg.patch_size)
        # The original image encoder rounds q and k through float16 around RoPE; kept for parity.
        self.enc_blocks = nn.ModuleList(
            Block(enc, cfg.enc_num_heads, cfg.mlp_ratio, base, rope_dtype=torch.float16)
            for _ in range(cfg.enc_depth)
        )
        self.enc_norm = LayerNorm(enc)
        self.decoder_embed = nn.Linear(enc, dec)
        self.dec_blocks = nn.ModuleList(self._decoder_blocks(cfg.dec_num_heads))
        self.dec_norm = LayerNorm(dec)
        self.enc_blocks_ray_map = nn.ModuleList(
            Block(enc, cfg.ray_enc_num_heads, 4.0, base) for _ in range(cfg.ray_enc_depth)
        )
        self.enc_norm_ray_map = LayerNorm(enc)
        self.pose_token = nn.Parameter(normal(1, 1, dec, std=0.02))
        self.pose_retriever = PoseRetriever(cfg.local_mem_size, enc, dec, cfg.dec_num_heads)
        self.register_tokens = nn.Embedding(
            cfg.state_size, enc, _weight=normal(cfg.state_size, enc, std=1.0)
        )
        # Only used by the original's batched training path (views without image / ray map).
        self.masked_img_token = nn.Parameter(normal(1, enc, std=0.02))
        self.masked_ray_map_token = nn.Parameter(normal(1, enc, std=0.02))
        self.decoder_embed_state = nn.Linear(enc, dec)
        self.dec_blocks_state = nn.ModuleList(self._decoder_blocks(cfg.state_dec_num_heads))
        self.dec_norm_state = LayerNorm(dec)
        self.downstream_head = build_head(cfg)
        self._position_cache: dict[tuple, Tensor] = {}

    def _decoder_blocks(self, heads: int) -> list[DecoderBlock]:
        cfg = self.config
        return [
            DecoderBlock(
                cfg.dec_embed_dim, heads, cfg.mlp_ratio, cfg.rope_base, cfg.norm_im2_in_dec
            )
            for _ in range(cfg.dec_depth)
        ]

    # ----------------------------------------------------------------------------------------
    # Convenience

    @property
    def update_rule(self) -> str:
        """The state update rule, "cut3r" (replace) or "ttt3r" (confidence-gated); settable."""
        return self.config.model_update_type

    @update_rule.setter
    def update_rule(self, rule: str) -> None:
        if rule not in UPDATE_RULES:
            raise TTT3RConfigError(f"update rule must be one of {UPDATE_RULES}, got {rule!r}")
        self.config = self.config.replace(model_update_type=rule)

    @property
    def device(self) -> torch.device:
        return self.pose_token.device

    def freeze(self) -> TTT3R:
        """Eval mode and no gradients, for use as a frozen backbone; returns self."""
        self.requires_grad_(False)
        return self.eval()

    # ----------------------------------------------------------------------------------------
    # State

    def initial_state_tokens(self) -> Tensor:
        """(state_size, dec_embed_dim) float32 state every sequence starts from."""
        with autocast_off(self.device):
            return self.decoder_embed_state(self.register_tokens.weight)

    def init_state(self, batch_size: int) -> BackboneState:
        """A fresh state for `batch_size` sequences (every sample counts as just reset)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        tokens = self.initial_state_tokens().expand(batch_size, -1, -1)
        memory = self.pose_retriever.mem.expand(batch_size, -1, -1)
        fresh = torch.ones(batch_size, dtype=torch.bool, device=self.device)
        return BackboneState(tokens, memory, fresh)

    def reset_state(self, state: BackboneState, reset: Tensor) -> BackboneState:
        """Return `state` with the samples where `reset` (B,) is True set back to the start."""
        mask = self._sample_mask(reset, state.batch_size, "reset")
        tokens = torch.where(mask[:, None, None], self.initial_state_tokens(), state.tokens)
        memory = torch.where(mask[:, None, None], self.pose_retriever.mem, state.memory)
        return BackboneState(tokens, memory, state.fresh | mask)

    def _sample_mask(self, mask: Tensor, batch_size: int, name: str) -> Tensor:
        mask = torch.as_tensor(mask, device=self.device)
        if mask.dtype != torch.bool or mask.shape != (batch_size,):
            raise ValueError(
                f"{name} must be a bool tensor of shape (B,) = ({batch_size},), "
                f"got {mask.dtype} of shape {tuple(mask.shape)}"
            )
        return mask

    # ----------------------------------------------------------------------------------------
    # Streaming API

    def step(
        self,
        frame: Tensor,
        state: BackboneState,
        reset: Tensor | None = None,
        *,
        update: Tensor | None = None,
        ray_map: Tensor | None = None,
        outputs: Collection[str] | str | None = None,
    ) -> tuple[BackboneOutput, BackboneState]:
        """Process one frame per sequence and return its predictions and the next state.

        Args:
            frame: (B, 3, H, W) float in [0, 1] (or uint8), H and W multiples of the patch size.
            state: from `init_state` or the previous step, for the same batch size.
            reset: optional (B,) bool; True starts a new sequence at this frame for that sample
                (its state and pose memory go back to the start before the frame is processed).
            update: optional (B,) bool; False leaves that sample's state untouched by this frame
                (it is still predicted), e.g. for padding frames. Default: all True.
            ray_map: optional (B, H, W, 6) ray map (origin, direction) whose encoding is added.
            outputs: field names of `BackboneOutput` to return, "all", or None for the defaults
                (DEFAULT_OUTPUTS). Heads whose outputs are not asked for are skipped.
        """
        self._check_frames(frame)
        self._check_state(state, frame.shape[0])
        image = self._normalise(frame.to(self.device, non_blocking=True))
        if reset is not None:
            state = self.reset_state(state, reset)
        if update is not None:
            update = self._sample_mask(update, state.batch_size, "update")
        if ray_map is not None:
            ray_map = self._check_ray_map(ray_map, image)
        return self._step(image, state, update, ray_map, self._resolve_outputs(outputs))

    def forward(
        self, frame: Tensor, state: BackboneState, reset: Tensor | None = None, **kwargs: Any
    ) -> tuple[BackboneOutput, BackboneState]:
        """Same as `step` (so hooks and `model(frame, state)` work)."""
        return self.step(frame, state, reset, **kwargs)

    @torch.no_grad()
    def forward_video(
        self,
        frames: Tensor,
        *,
        state: BackboneState | None = None,
        reset: Tensor | None = None,
        outputs: Collection[str] | str | None = None,
        output_device: torch.device | str | None = None,
        progress: bool = False,
    ) -> tuple[BackboneOutput, BackboneState]:
        """Run a clip (B, T, 3, H, W) in [0, 1] frame by frame (no gradients).

        Each frame is moved to the model's device as it is processed and its requested outputs
        are written into preallocated (B, T, ...) tensors on `output_device` (default: the
        model's device), so nothing else grows with T. `reset` is (B,) (applied before frame 0)
        or (B, T) (True where a new sequence starts). Returns the stacked outputs and the state.
        """
        if not isinstance(frames, Tensor) or frames.ndim != 5:
            raise ValueError(f"frames must be a (B, T, 3, H, W) tensor, got {_describe(frames)}")
        batch, length = frames.shape[:2]
        if length == 0:
            raise ValueError("frames has no time steps (T = 0)")
        self._check_frames(frames.flatten(0, 1))
        state = self.init_state(batch) if state is None else state
        self._check_state(state, batch)
        resets = self._video_resets(reset, batch, length)
        wanted = self._resolve_outputs(outputs)
        collected: dict[str, Any] = {}  # tensors, or tuples of tensors, per output field
        for t in tqdm(range(length), desc="TTT3R", unit="frame", disable=not progress):
            if resets is not None:
                state = self.reset_state(state, resets[:, t])
            image = self._normalise(frames[:, t].to(self.device, non_blocking=True))
            out, state = self._step(image, state, None, None, wanted)
            _store(collected, out, t, length, output_device)
        return BackboneOutput(**collected), state

    # ----------------------------------------------------------------------------------------
    # The model

    def encode_image(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) in [-1, 1] -> tokens (B, N, enc_embed_dim) and positions (B, N, 2)."""
        x = self.patch_embed(image)
        positions = self.patch_positions(image)
        for block in self.enc_blocks:
            x = block(x, positions)
        return self.enc_norm(x), positions

    def encode_ray_map(self, ray_map: Tensor) -> Tensor:
        """(B, H, W, 6) channels-last ray map -> (B, N, enc_embed_dim) tokens."""
        rays = ray_map.permute(0, 3, 1, 2)
        x = self.patch_embed_ray_map(rays)
        positions = self.patch_positions(rays)
        for block in self.enc_blocks_ray_map:
            x = block(x, positions)
        return self.enc_norm_ray_map(x)

    def patch_positions(self, image: Tensor) -> Tensor:
        p = self.config.patch_size
        grid = self._cached(("patch", image.shape[-2] // p, image.shape[-1] // p, image.device))
        return grid.expand(image.shape[0], -1, -1)

    def state_positions(self, batch_size: int) -> Tensor:
        return self._cached(("state", self.device)).expand(batch_size, -1, -1)

    def _cached(self, key: tuple) -> Tensor:
        if key not in self._position_cache:
            with torch.inference_mode(False):  # usable later outside inference mode too
                self._position_cache[key] = self._make_positions(key)
        return self._position_cache[key]

    def _make_positions(self, key: tuple) -> Tensor:
        if key[0] == "patch":
            return grid_positions(key[1], key[2], key[3])[None]
        size = self.config.state_size
        if self.config.state_pe == "2d":
            return row_major_positions(size, self.config.state_grid_width, key[1])[None]
        index = torch.arange(size, device=key[1])
        return torch.stack([index, index], dim=-1)[None]  # "1d": (i, i)

    def decode(
        self,
        state: Tensor,
        features: Tensor,
        positions: Tensor,
        pose_query: Tensor,
        alignment: bool,
    ) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """Run both decoders side by side; each layer reads the other branch's previous output.

        Returns the normalised candidate state, the 4 hook layers for the heads
        `[features, dec[L/2] (no pose), dec[3L/4] (no pose), dec_norm(dec[L]) (pose first)]`
        and, with `alignment`, the state->image logit mean per state token (B, S).
        """
        batch, depth = features.shape[0], self.config.dec_depth
        image = torch.cat([pose_query, self.decoder_embed(features)], dim=1)
        pose_position = positions.new_full((batch, 1, 2), -1)
        image_positions = torch.cat([pose_position, positions], dim=1)
        state_positions = self.state_positions(batch)
        hook_layers = (depth * 2 // 4, depth * 3 // 4)  # one layer twice when depth = 2
        hooks, logit_sum = [features], None
        for layer, (state_block, image_block) in enumerate(
            zip(self.dec_blocks_state, self.dec_blocks, strict=True), start=1
        ):
            new_state, logits = state_block(
                state, image, state_positions, image_positions, alignment
            )
            image, _ = image_block(image, state, image_positions, state_positions)
            state = new_state
            if logits is not None:
                logit_sum = logits if logit_sum is None else logit_sum + logits
            hooks += [image[:, 1:]] * hook_layers.count(layer)
        hooks.append(self.dec_norm(image))
        mean_logits = None if logit_sum is None else logit_sum / depth
        return self.dec_norm_state(state), hooks, mean_logits

    def _step(
        self,
        image: Tensor,
        state: BackboneState,
        update: Tensor | None,
        ray_map: Tensor | None,
        wanted: frozenset[str],
    ) -> tuple[BackboneOutput, BackboneState]:
        features, positions = self.encode_image(image)
        if ray_map is not None:
            features = features + self.encode_ray_map(ray_map)
        summary = features.mean(dim=1, keepdim=True)
        fresh = state.fresh[:, None, None]
        pose_query = torch.where(
            fresh, self.pose_token, self.pose_retriever.read(summary, state.memory)
        )
        need_gate = self.update_rule == "ttt3r" or "gate" in wanted
        candidate, hooks, mean_logits = self.decode(
            state.tokens, features, positions, pose_query, need_gate
        )
        final = hooks[-1]
        memory_candidate = self.pose_retriever.write(state.memory, summary, final[:, :1])
        parts = {_HEAD_PARTS[name] for name in wanted if name in _HEAD_PARTS}
        predictions = self.downstream_head(hooks, positions, tuple(image.shape[-2:]), parts)
        gate = None if mean_logits is None else torch.sigmoid(mean_logits)
        next_state = self._update_state(state, candidate, memory_candidate, gate, update)

        available = {
            **predictions,
            "camera_to_world": pose_to_matrix(predictions["camera_pose"]),
            "enc_tokens": features,
            "dec_tokens": final[:, 1:],
            "pose_token": final[:, 0],
            "positions": positions,
            "pose_query": pose_query,
            "dec_hooks": tuple(hooks),
            "state_candidate": candidate,
            "memory_candidate": memory_candidate,
            "gate": gate,
        }
        return BackboneOutput(**{name: available[name] for name in wanted}), next_state

    def _update_state(
        self,
        state: BackboneState,
        candidate: Tensor,
        memory_candidate: Tensor,
        gate: Tensor | None,
        update: Tensor | None,
    ) -> BackboneState:
        """CUT3R replaces the state; TTT3R blends it by the per-token gate, except on a first frame.

        `update` False keeps a sample's state, memory and first-frame flag as they were.
        """
        keep = torch.ones_like(state.fresh) if update is None else update
        weight = keep.to(torch.float32)[:, None]  # (B, 1)
        if self.update_rule == "ttt3r":
            assert gate is not None, "the ttt3r update rule blends by the gate"
            weight = torch.where(state.fresh[:, None], weight, weight * gate)  # (B, S)
        weight = weight[..., None]
        tokens = candidate * weight + state.tokens * (1 - weight)
        memory_weight = keep.to(torch.float32)[:, None, None]
        memory = memory_candidate * memory_weight + state.memory * (1 - memory_weight)
        dtype = state.tokens.dtype
        return BackboneState(tokens.to(dtype), memory.to(dtype), state.fresh & ~keep)

    # ----------------------------------------------------------------------------------------
    # Input checks

    def _normalise(self, frame: Tensor) -> Tensor:
        """[0, 1] (or uint8) frames -> the [-1, 1] range the model was trained on.

        Small overshoots (e.g. from bicubic resizing) are clipped, as 8-bit images would be.
        """
        if frame.dtype == torch.uint8:
            return frame.float() / 127.5 - 1
        return frame.float().clamp(0, 1) * 2 - 1

    def _check_frames(self, frame: Tensor) -> None:
        """Shape, dtype, finiteness and [0, 1] range (one device sync)."""
        if not isinstance(frame, Tensor) or frame.ndim != 4:
            raise ValueError(f"frame must be a (B, 3, H, W) tensor, got {_describe(frame)}")
        if frame.shape[1] != 3:
            hint = " (channels-last? use frame.permute(0, 3, 1, 2))" if frame.shape[-1] == 3 else ""
            raise ValueError(
                f"frame must have 3 (RGB) channels in dim 1, got shape {tuple(frame.shape)}{hint}"
            )
        p = self.config.patch_size
        if frame.shape[-2] % p or frame.shape[-1] % p:
            raise ValueError(
                f"frame size {tuple(frame.shape[-2:])} (H, W) must be a multiple of the patch "
                f"size {p}; "
                f"resize or crop (e.g. 512x384 for the released model)"
            )
        if frame.dtype == torch.uint8 or frame.is_meta:  # meta: no values (shape-only runs)
            return
        fix = (
            ": pass raw frames, the backbone normalises them itself (do not pre-normalise to "
            "[-1, 1] or with ImageNet statistics)"
        )
        check_frame_values(frame, "frame", fix)

    def _check_state(self, state: BackboneState, batch_size: int) -> None:
        """A state of this model's shape and device, for `batch_size` sequences."""
        if not isinstance(state, BackboneState):
            raise TypeError(
                f"state must be a BackboneState from model.init_state, got {type(state).__name__}"
            )
        cfg, batch = self.config, state.batch_size
        expected = {
            "tokens": (batch, cfg.state_size, cfg.dec_embed_dim),
            "memory": (batch, cfg.local_mem_size, 2 * cfg.dec_embed_dim),
            "fresh": (batch,),
        }
        for name, shape in expected.items():
            value = getattr(state, name)
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"state does not belong to this model: state.{name} has shape "
                    f"{tuple(value.shape)}, expected {shape}; start from model.init_state"
                )
            if value.device != self.device:
                raise ValueError(
                    f"state.{name} is on {value.device} but the model is on {self.device}; "
                    "move it with state.to(model.device)"
                )
        if batch != batch_size:
            raise ValueError(
                f"frame batch size {batch_size} does not match the state's batch size {batch}; "
                "use model.init_state(batch_size) for this batch"
            )

    def _check_ray_map(self, ray_map: Tensor, image: Tensor) -> Tensor:
        expected = (image.shape[0], *image.shape[-2:], 6)
        if not isinstance(ray_map, Tensor) or tuple(ray_map.shape) != expected:
            raise ValueError(
                f"ray_map must have shape (B, H, W, 6) = {expected}, got {_describe(ray_map)}"
            )
        if not torch.isfinite(ray_map).all():
            raise ValueError("ray_map contains NaN or infinite values")
        return ray_map.to(self.device, torch.float32)

    def _resolve_outputs(self, outputs: Collection[str] | str | None) -> frozenset[str]:
        if outputs is None or outputs == "all":
            fields = DEFAULT_OUTPUTS if outputs is None else OUTPUT_FIELDS
            return frozenset(n for n in fields if n != "rgb" or self.config.rgb_head)
        if isinstance(outputs, str):
            names = frozenset([outputs])
        elif isinstance(outputs, Collection):
            names = frozenset(outputs)
        else:
            raise TypeError(
                "outputs must be a field name, a collection of names, 'all' or None, "
                f"got {type(outputs).__name__}"
            )
        unknown = sorted(names - set(OUTPUT_FIELDS))
        if unknown:
            raise ValueError(
                f"unknown output names {unknown}; choose from {list(OUTPUT_FIELDS)} or 'all'"
            )
        if "rgb" in names and not self.config.rgb_head:
            raise ValueError("'rgb' was requested but this model has no RGB head (rgb_head=False)")
        return names

    def _video_resets(self, reset: Tensor | None, batch: int, length: int) -> Tensor | None:
        if reset is None:
            return None
        reset = torch.as_tensor(reset, device=self.device)
        if reset.dtype == torch.bool and reset.shape == (batch,):
            return torch.cat([reset[:, None], reset.new_zeros(batch, length - 1)], dim=1)
        if reset.dtype == torch.bool and reset.shape == (batch, length):
            return reset
        raise ValueError(
            f"reset must be a bool tensor of shape (B,) = ({batch},) or "
            f"(B, T) = ({batch}, {length}), "
            f"got {reset.dtype} of shape {tuple(reset.shape)}"
        )


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _store(
    collected: dict, out: BackboneOutput, t: int, length: int, device: torch.device | str | None
) -> None:
    """Write frame t's outputs into (B, T, ...) buffers, allocating them at the first frame."""
    for name in OUTPUT_FIELDS:
        value = getattr(out, name)
        if value is None:
            continue
        values = value if isinstance(value, tuple) else (value,)
        if name not in collected:
            collected[name] = tuple(
                torch.empty(
                    (v.shape[0], length, *v.shape[1:]),
                    dtype=v.dtype,
                    device=device if device is not None else v.device,
                )
                for v in values
            )
        for buffer, v in zip(collected[name], values, strict=True):
            buffer[:, t].copy_(v)
    if t == length - 1:
        for name, buffers in collected.items():
            collected[name] = buffers if name == "dec_hooks" else buffers[0]
