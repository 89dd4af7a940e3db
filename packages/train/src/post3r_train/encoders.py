"""Feature encoders for the slot module: frames (B, T, 3, H, W) in [0, 1] to patch tokens.

Every encoder normalises its own input (DESIGN.md: one place, no double normalisation) and
returns `EncoderOutput`: tokens (B, T, N, D) on an h×w patch grid, row-major.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from post3r_train.errors import MissingWeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EncoderOutput(NamedTuple):
    """features: (B, T, N, D) tokens; grid: (h, w) with h·w = N."""

    features: Tensor
    grid: tuple[int, int]


def _check_frames(frames: Tensor) -> None:
    if frames.ndim != 5 or frames.shape[2] != 3:
        raise ValueError(f"frames must be (B, T, 3, H, W), got {tuple(frames.shape)}")


class PatchEncoder(nn.Module):
    """A small trainable encoder: each patch's pixels (shifted to [-1, 1]) and its (y, x) centre
    in [-1, 1], mapped linearly to `hidden_dim` (a strided convolution). The coordinates let slot
    attention group by position as well as appearance; the model's input MLP adds the
    non-linearity."""

    def __init__(self, patch_size: int = 8, hidden_dim: int = 64) -> None:
        super().__init__()
        self.patch_size, self.dim = patch_size, hidden_dim
        self.embed = nn.Conv2d(5, hidden_dim, patch_size, stride=patch_size)

    def forward(self, frames: Tensor) -> EncoderOutput:
        _check_frames(frames)
        batch, time, _, height, width = frames.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"frame size {height}x{width} is not divisible by "
                f"model.encoder.patch_size={self.patch_size}"
            )
        x = frames.flatten(0, 1).float() * 2 - 1
        ys = torch.linspace(-1, 1, height, device=x.device)
        xs = torch.linspace(-1, 1, width, device=x.device)
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij")).expand(len(x), -1, -1, -1)
        tokens = self.embed(torch.cat((x, coords), dim=1))  # (BT, D, h, w)
        grid = (tokens.shape[-2], tokens.shape[-1])
        tokens = tokens.flatten(2).transpose(1, 2).unflatten(0, (batch, time))
        return EncoderOutput(tokens, grid)


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """A state dict from .safetensors, or from a .pth/.bin/.pt torch file (optionally wrapped in
    a `model` or `state_dict` entry)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


class DinoV2Encoder(nn.Module):
    """A frozen timm ViT (DINOv2 ViT-B/14 by default): tokens of block `block` before the final
    norm, prefix tokens (CLS, registers) dropped, as SlotContrast's `vit_block12`.

    Frames are resized to `image_size` (bicubic) if given, then ImageNet-normalised here.
    Weights come from `weights` (timm or original DINOv2 layout; timm converts the latter);
    nothing is downloaded. `pretrained=False` builds random weights (tests only).
    """

    vit: Any  # a timm VisionTransformer, read through attributes nn.Module cannot type
    dim: int

    def __init__(
        self,
        timm_model: str = "vit_base_patch14_dinov2",
        *,
        weights: str | Path | None = None,
        pretrained: bool = True,
        block: int = 12,
        image_size: int | None = None,
        timm_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        import timm

        kwargs = dict(timm_kwargs or {})
        if image_size is not None:
            kwargs.setdefault("img_size", image_size)
        if pretrained:
            if weights is None:
                raise MissingWeightsError(
                    f"model.encoder.name=dinov2 needs pretrained {timm_model} weights (Meta's "
                    f"DINOv2, published by timm at https://huggingface.co/timm/{timm_model}"
                    ".lvd142m) and nothing is downloaded at run time: download them once, e.g. "
                    "`hf download "
                    f"timm/{timm_model}.lvd142m model.safetensors --local-dir weights/`, then "
                    "set model.encoder.weights=weights/model.safetensors "
                    "(or model.encoder.pretrained=false for random weights, tests only)"
                )
            if not Path(weights).is_file():
                raise MissingWeightsError(
                    f"model.encoder.weights={weights}: no such file (a .safetensors or "
                    f".pth/.bin state dict of {timm_model}: Meta's DINOv2 weights as timm "
                    f"publishes them, https://huggingface.co/timm/{timm_model}.lvd142m; "
                    f"`hf download timm/{timm_model}.lvd142m model.safetensors --local-dir "
                    "weights/` fetches them once)"
                )
        self.vit = timm.create_model(timm_model, pretrained=False, num_classes=0, **kwargs)
        if pretrained:
            self._load(Path(weights))  # type: ignore[arg-type]
        depth = len(self.vit.blocks)
        if not 1 <= block <= depth:
            raise ValueError(f"model.encoder.block={block} is outside 1..{depth} for {timm_model}")
        self.block = block
        self.image_size = image_size
        self.dim = self.vit.embed_dim
        self.mean: Tensor
        self.std: Tensor
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _load(self, path: Path) -> None:
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = load_state_dict_file(path)
        state = checkpoint_filter_fn(state, self.vit)  # original DINOv2 names -> timm names
        missing, unexpected = self.vit.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("head")]
        if missing or unexpected:
            raise ValueError(
                f"{path} does not fit {type(self.vit).__name__}: missing {missing[:6]}, "
                f"unexpected {unexpected[:6]}"
            )

    def train(self, mode: bool = True) -> DinoV2Encoder:
        return super().train(False)  # frozen: always in eval mode (no dropout/drop-path)

    @torch.no_grad()
    def forward(self, frames: Tensor) -> EncoderOutput:
        _check_frames(frames)
        batch, time = frames.shape[:2]
        x = frames.flatten(0, 1).float()
        if self.image_size is not None and x.shape[-2:] != (self.image_size, self.image_size):
            size = (self.image_size, self.image_size)
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
        patch = self.vit.patch_embed.patch_size
        if x.shape[-2] % patch[0] or x.shape[-1] % patch[1]:
            raise ValueError(
                f"frame size {tuple(x.shape[-2:])} is not a multiple of the ViT patch {patch}: "
                "set model.encoder.image_size"
            )
        x = (x - self.mean) / self.std
        (tokens,) = self.vit.forward_intermediates(
            x, indices=[self.block - 1], norm=False, intermediates_only=True, output_fmt="NLC"
        )
        grid = (x.shape[-2] // patch[0], x.shape[-1] // patch[1])
        return EncoderOutput(tokens.unflatten(0, (batch, time)), grid)
