"""Model configuration.

Field names follow the arguments of the original `ARCroco3DStereoConfig` (and the `CrocoConfig`
keyword arguments it forwards), so the constructor string stored in an original checkpoint maps
onto this class one to one. Three fields the original hard-codes are exposed so that tiny test
models are possible: `ray_enc_num_heads`, `dpt_feature_dim` and `dpt_layer_dims`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from post3r_backbone.errors import TTT3RConfigError

INF = math.inf
UPDATE_RULES = ("cut3r", "ttt3r")


@dataclass(frozen=True)
class TTT3RConfig:
    """Hyper-parameters of the CUT3R architecture; the defaults are the released 512 DPT model."""

    # ARCroco3DStereoConfig arguments.
    output_mode: str = "pts3d+pose"
    head_type: str = "dpt"  # "dpt" (released 512 model) or "linear" (224 model)
    depth_mode: tuple = ("exp", -INF, INF)
    conf_mode: tuple = ("exp", 1, INF)
    pose_mode: tuple = ("exp", -INF, INF)
    freeze: str = "encoder"  # training-time only; kept so checkpoints round-trip
    landscape_only: bool = False  # ignored: images are used as given (the released loader's choice)
    patch_embed_cls: str = "PatchEmbedDust3R"  # or "ManyAR_PatchEmbed": same weights, same result
    ray_enc_depth: int = 2
    state_size: int = 768
    local_mem_size: int = 256
    state_pe: str = "2d"
    state_dec_num_heads: int = 16
    depth_head: bool = False  # accepted and ignored, as in the original pts3d+pose heads
    rgb_head: bool = True
    pose_conf_head: bool = False  # accepted and ignored, as in the original pts3d+pose heads
    pose_head: bool = True
    model_update_type: str = "ttt3r"  # "cut3r": replace the state; "ttt3r": confidence-gated
    # CrocoConfig arguments.
    img_size: tuple = (512, 512)
    patch_size: int = 16
    mask_ratio: float = 0.9  # pre-training only, unused
    enc_embed_dim: int = 1024
    enc_depth: int = 24
    enc_num_heads: int = 16
    dec_embed_dim: int = 768
    dec_depth: int = 12
    dec_num_heads: int = 12
    mlp_ratio: float = 4
    norm_im2_in_dec: bool = True
    pos_embed: str = "RoPE100"
    # Constants of the original, exposed for small models.
    ray_enc_num_heads: int = 16
    dpt_feature_dim: int = 256
    dpt_layer_dims: tuple = (96, 192, 384, 768)

    def __post_init__(self) -> None:
        for name in ("depth_mode", "conf_mode", "pose_mode", "img_size", "dpt_layer_dims"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name)))
        object.__setattr__(self, "img_size", _pair(self.img_size))
        _validate(self)

    @property
    def rope_base(self) -> float:
        """The RoPE base frequency encoded in `pos_embed` ("RoPE100" -> 100.0)."""
        return float(self.pos_embed[len("RoPE") :])

    @property
    def state_grid_width(self) -> int:
        """Width of the 2D grid the state tokens sit on: floor(sqrt(S)), made even."""
        width = math.isqrt(self.state_size)
        return width + 1 if width % 2 else width

    def replace(self, **overrides: Any) -> TTT3RConfig:
        """A copy with some fields changed; unknown names raise TTT3RConfigError."""
        _reject_unknown(overrides)
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TTT3RConfig:
        """Build from a mapping (e.g. JSON); unknown keys raise TTT3RConfigError."""
        _reject_unknown(values)
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> TTT3RConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TTT3RConfig:
        """A named preset (see PRESETS) with optional field overrides."""
        if name not in PRESETS:
            raise TTT3RConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name].replace(**overrides)


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TTT3RConfig)]


def _reject_unknown(values: Mapping[str, Any]) -> None:
    known = _field_names()
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TTT3RConfigError(f"unknown TTT3R config key {key!r}{hint}; valid keys: {known}")


def _as_tuple(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_as_number(v) for v in value)
    return value


def _as_number(value: Any) -> Any:
    """JSON files spell infinities as strings ("inf", "-inf"); turn them back into floats."""
    if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "-inf", "infinity"):
        return float(value)
    return value


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _validate(cfg: TTT3RConfig) -> None:
    def need(condition: bool, message: str) -> None:
        if not condition:
            raise TTT3RConfigError(message)

    need(
        cfg.output_mode == "pts3d+pose",
        f"output_mode must be 'pts3d+pose', got {cfg.output_mode!r}",
    )
    need(
        cfg.head_type in ("dpt", "linear"),
        f"head_type must be 'dpt' or 'linear', got {cfg.head_type!r}",
    )
    need(
        cfg.pose_head, "pose_head=False is not supported (the pts3d+pose heads need the pose token)"
    )
    need(
        cfg.patch_embed_cls in ("PatchEmbedDust3R", "ManyAR_PatchEmbed"),
        "patch_embed_cls must be PatchEmbedDust3R or ManyAR_PatchEmbed, "
        f"got {cfg.patch_embed_cls!r}",
    )
    need(cfg.state_pe in ("2d", "1d"), f"state_pe must be '2d' or '1d', got {cfg.state_pe!r}")
    need(
        cfg.model_update_type in UPDATE_RULES,
        f"model_update_type must be one of {UPDATE_RULES}, got {cfg.model_update_type!r}",
    )
    need(
        isinstance(cfg.pos_embed, str) and cfg.pos_embed.startswith("RoPE"),
        f"pos_embed must be 'RoPE<base>' such as 'RoPE100', got {cfg.pos_embed!r}",
    )
    try:
        base = cfg.rope_base
    except ValueError:
        raise TTT3RConfigError(
            f"pos_embed {cfg.pos_embed!r}: the text after 'RoPE' is not a number"
        ) from None
    need(base > 0, f"pos_embed base must be positive, got {base}")
    for mode_name in ("depth_mode", "pose_mode"):
        mode = getattr(cfg, mode_name)
        need(
            len(mode) == 3 and mode[0] in ("exp", "linear", "square") and mode[1:] == (-INF, INF),
            f"{mode_name} must be ('exp'|'linear'|'square', -inf, inf), got {mode}",
        )
    need(
        len(cfg.conf_mode) == 3 and cfg.conf_mode[0] in ("exp", "sigmoid"),
        f"conf_mode must be ('exp'|'sigmoid', vmin, vmax), got {cfg.conf_mode}",
    )
    positive = ("patch_size", "enc_embed_dim", "enc_depth", "dec_embed_dim", "state_size")
    for name in (*positive, "local_mem_size", "ray_enc_depth"):
        value, low = getattr(cfg, name), 0 if name == "ray_enc_depth" else 1
        need(
            isinstance(value, int) and not isinstance(value, bool) and value >= low,
            f"{name} must be an int >= {low}, got {value!r}",
        )
    need(
        len(cfg.img_size) == 2,
        f"img_size must be an int or (height, width), got {cfg.img_size}",
    )
    need(
        cfg.dec_depth >= 2,
        f"dec_depth must be >= 2 (the heads read layers L/2 and 3L/4), got {cfg.dec_depth}",
    )
    need(
        all(s % cfg.patch_size == 0 for s in cfg.img_size),
        f"img_size {cfg.img_size} must be a multiple of patch_size {cfg.patch_size}",
    )
    roped = {
        "encoder (enc_embed_dim / enc_num_heads)": (cfg.enc_embed_dim, cfg.enc_num_heads),
        "ray encoder (enc_embed_dim / ray_enc_num_heads)": (
            cfg.enc_embed_dim,
            cfg.ray_enc_num_heads,
        ),
        "image decoder (dec_embed_dim / dec_num_heads)": (cfg.dec_embed_dim, cfg.dec_num_heads),
        "state decoder (dec_embed_dim / state_dec_num_heads)": (
            cfg.dec_embed_dim,
            cfg.state_dec_num_heads,
        ),
    }
    for what, (dim, heads) in roped.items():
        need(
            heads > 0 and dim % heads == 0 and (dim // heads) % 4 == 0,
            f"{what} = {dim} / {heads}: the width must split into heads whose dim is a multiple "
            "of 4 (2D RoPE rotates two pairs of halves)",
        )
    need(len(cfg.dpt_layer_dims) == 4, f"dpt_layer_dims needs 4 entries, got {cfg.dpt_layer_dims}")
    need(cfg.dpt_feature_dim % 2 == 0, "dpt_feature_dim must be even")


# The original constructor's own defaults: a constructor string only lists what differs from these.
# model_update_type is not stored in checkpoints; it keeps this package's default ("ttt3r").
ORIGINAL_DEFAULTS: dict[str, Any] = {
    "output_mode": "pts3d",
    "head_type": "linear",
    "depth_mode": ("exp", -INF, INF),
    "conf_mode": ("exp", 1, INF),
    "pose_mode": ("exp", -INF, INF),
    "freeze": "none",
    "landscape_only": True,
    "patch_embed_cls": "PatchEmbedDust3R",
    "ray_enc_depth": 2,
    "state_size": 324,
    "local_mem_size": 256,
    "state_pe": "2d",
    "state_dec_num_heads": 16,
    "depth_head": False,
    "rgb_head": False,
    "pose_conf_head": False,
    "pose_head": False,
    "img_size": (224, 224),
    "patch_size": 16,
    "mask_ratio": 0.9,
    "enc_embed_dim": 768,
    "enc_depth": 12,
    "enc_num_heads": 12,
    "dec_embed_dim": 512,
    "dec_depth": 8,
    "dec_num_heads": 16,
    "mlp_ratio": 4,
    "norm_im2_in_dec": True,
    "pos_embed": "cosine",
}

_MODEL_CALL = "ARCroco3DStereo"
_CONFIG_CALL = "ARCroco3DStereoConfig"


def parse_constructor_string(text: str) -> dict[str, Any]:
    """Keyword arguments of `ARCroco3DStereo(ARCroco3DStereoConfig(...))`, without `eval`.

    Only literals, `inf`, tuples/lists, `float('inf')` and the two constructor names are
    accepted; anything else raises TTT3RConfigError naming the offending piece of the string.
    """
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as error:
        raise TTT3RConfigError(
            f"model constructor string is not valid Python syntax: {error}"
        ) from None
    if isinstance(node, ast.Call) and _call_name(node) == _MODEL_CALL:
        if len(node.args) != 1 or node.keywords:
            raise TTT3RConfigError(
                f"{_MODEL_CALL}(...) must wrap exactly one {_CONFIG_CALL}(...) call"
            )
        node = node.args[0]
    if not isinstance(node, ast.Call) or _call_name(node) != _CONFIG_CALL or node.args:
        raise TTT3RConfigError(
            f"expected {_MODEL_CALL}({_CONFIG_CALL}(key=value, ...)), got: {text[:120]!r}"
        )
    kwargs = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            raise TTT3RConfigError("'**' arguments are not supported in the constructor string")
        kwargs[keyword.arg] = _literal(keyword.value, text)
    return kwargs


def config_from_constructor_string(text: str, **overrides: Any) -> TTT3RConfig:
    """The config an original checkpoint's `args.model` string describes (plus overrides)."""
    values = {**ORIGINAL_DEFAULTS, **parse_constructor_string(text), **overrides}
    return TTT3RConfig.from_dict(values)


def _call_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return node.func.id
    return None


def _literal(node: ast.AST, text: str) -> Any:
    if isinstance(node, ast.Constant) and isinstance(
        node.value, str | int | float | bool | type(None)
    ):
        return node.value
    if isinstance(node, ast.Tuple | ast.List):
        return tuple(_literal(item, text) for item in node.elts)
    if isinstance(node, ast.Name) and node.id == "inf":
        return INF
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _literal(node.operand, text)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    if (
        isinstance(node, ast.Call)
        and _call_name(node) == "float"
        and len(node.args) == 1
        and not node.keywords
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
        and node.args[0].value.strip().lower() in ("inf", "+inf", "-inf", "infinity", "-infinity")
    ):
        return float(node.args[0].value)
    piece = ast.get_source_segment(text.strip(), node) or ast.dump(node)
    raise TTT3RConfigError(
        f"unsupported expression {piece!r} in the model constructor string: only literals, inf, "
        "tuples and float('inf') are accepted (nothing is evaluated)"
    )


# Presets. "ttt3r_512" is the released cut3r_512_dpt_4_64 model run with TTT3R's update rule.
PRESETS: dict[str, TTT3RConfig] = {
    "ttt3r_512": TTT3RConfig(),
    "cut3r_224_linear": TTT3RConfig(head_type="linear", img_size=(224, 224)),
    "tiny": TTT3RConfig(
        img_size=(64, 64),
        enc_embed_dim=64,
        enc_depth=2,
        enc_num_heads=2,
        dec_embed_dim=64,
        dec_depth=4,
        dec_num_heads=2,
        state_dec_num_heads=4,
        state_size=16,
        local_mem_size=8,
        ray_enc_num_heads=2,
        dpt_feature_dim=32,
        dpt_layer_dims=(16, 32, 64, 128),
    ),
}

# Fields that do not change the weights or the computation of a frozen model.
_NOT_ARCHITECTURE = (
    "freeze",
    "landscape_only",
    "patch_embed_cls",
    "mask_ratio",
    "depth_head",
    "pose_conf_head",
)


def matching_preset(config: TTT3RConfig) -> str | None:
    """Name of the preset with the same architecture as `config` (update rule ignored), if any."""

    def key(cfg: TTT3RConfig) -> dict[str, Any]:
        values = cfg.to_dict()
        for name in (*_NOT_ARCHITECTURE, "model_update_type"):
            values.pop(name)
        return values

    return next((name for name, preset in PRESETS.items() if key(preset) == key(config)), None)
