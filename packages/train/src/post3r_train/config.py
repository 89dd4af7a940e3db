"""The whole run configuration: OmegaConf structured dataclasses, YAML loading and overrides.

One schema (`RunConfig`) types every key. A YAML file is merged over it, then `key=value`
overrides (YAML syntax for values); an unknown key or a value of the wrong type is rejected with
the key's full name and, for unknown keys, the closest valid key. Keys keep the original POST3R
names (`model.num_slots`, `dataset.batch_size`, `trainer.max_steps`, ...).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from post3r_train.checks import require_one_of, require_positive
from post3r_train.engine import OptimConfig, TrainerConfig
from post3r_train.errors import ConfigError

CONFIG_DIR = Path(__file__).with_name("configs")
"""The configs a run can name (`default`, `smoke`, `ytvis2021`, `post3r_reference`): package
data, so they are in the wheel too; the repository's top-level `configs/` links here."""
ENCODERS = ("patch", "dinov2", "ttt3r")
TEACHERS = ("dataset", "ttt3r", "cached", "none")
UPDATE_RULES = ("ttt3r", "cut3r")
FEATURE_TARGETS = ("encoder", "rgb")
POSITION_EMBEDDINGS = ("learned", "fourier")
POINTMAP_FRAMES = ("world", "camera")
POINTMAP_ARCHITECTURES = ("conv", "mlp")
INITIALIZERS = ("fixed", "gaussian")
PREDICTORS = ("transformer", "none")
GROUPERS = ("slot_attention", "recurrent")


@dataclass
class EncoderConfig:
    """Where the slot module's features come from.

    `patch`: a small trainable CNN on patches (the synthetic default). `dinov2`: a frozen timm ViT
    (`timm_model`, block `block` tokens before the final norm, CLS and registers dropped, ImageNet
    normalisation) with weights from `weights` (.safetensors or a .pth/.bin state dict); set
    `pretrained=false` for random weights (tests only). `ttt3r`: the 3D teacher's encoder tokens
    (needs `model.teacher.name=ttt3r`).
    """

    name: str = "patch"
    # dinov2
    timm_model: str = "vit_base_patch14_dinov2"
    weights: str | None = None
    pretrained: bool = True
    block: int = 12
    image_size: int | None = None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    # patch
    patch_size: int = 8
    hidden_dim: int = 64


@dataclass
class TeacherConfig:
    """The 3D target: `dataset` (ground-truth pointmaps and poses from the shards), `cached` (the
    frozen TTT3R backbone's outputs over whole videos, computed once by `apps/cache-teacher` and
    read from sidecar shards), `ttt3r` (the same backbone run online over each clip, from a fresh
    state, on square crops) or `none` (no pointmap decoder or loss).

    For `ttt3r` and `cache-teacher`: `checkpoint` is a converted or original TTT3R checkpoint;
    without one, the architecture `preset` with random weights is used only if
    `random_weights=true` (tests). `update_rule`: the state update, `ttt3r` or `cut3r`.
    `image_size`: the online teacher's square input; for the cache, the input's long side (the
    short side keeps the video's aspect ratio, rounded to a multiple of 16).
    For `cached`: `cache` is the cache directory (default `<dataset.root>/teacher-cache`, where
    `cache-teacher` writes); `cache_resolution` is the stored maps' short side (default
    max(model.decoder_resolution): enough for the decoder after the short-side crop).
    """

    name: str = "dataset"
    checkpoint: str | None = None
    preset: str = "ttt3r_512"
    random_weights: bool = False
    image_size: int = 512
    update_rule: str = "ttt3r"
    cache: str | None = None
    cache_resolution: int | None = None


@dataclass
class SlotModuleConfig:
    """The slot module: an initialiser, a grouper (the corrector) and an optional predictor.

    `grouper`: `slot_attention` (softmax over slots, GRU, `model.num_iterations` iterations per
    frame, `first_frame_iterations` on the first; SlotContrast) or `recurrent` (POST3R's
    `RecurrentSlotCorrector`: `model.num_iterations` transformer decoder blocks with 2D RoPE,
    cross-attention with a softmax over patches, no competition between slots, and a per-sample
    TTT3R-style gate blending the new slots with the previous frame's; `heads` attention heads,
    default slot_dim // 64 as the reference; `detach_gate` stops the gate's gradient, as the
    reference does). Either way the decoders' alpha masks are the masks that are scored; the
    grouper's own masks (`ModelOutput.attention_masks`) are its grouping.
    `implicit_gradient` (slot attention): back-propagate through the last iteration only (the
    earlier ones as a fixed-point solver); same forward values, steadier training.
    `init_noise_std`: with `initializer=fixed`, Gaussian noise of this std added to the learned
    slots in training (the reference's 0.01); evaluation starts from the learned slots.
    `detach_between_frames`: no back-propagation through time (the reference's choice).
    """

    grouper: str = "slot_attention"
    initializer: str = "fixed"
    init_noise_std: float = 0.0
    first_frame_iterations: int = 3
    implicit_gradient: bool = False
    input_hidden_dim: int | None = None
    mlp_hidden_dim: int | None = None
    predictor: str = "transformer"
    predictor_heads: int = 4
    predictor_blocks: int = 1
    detach_between_frames: bool = False
    heads: int | None = None
    detach_gate: bool = False


@dataclass
class FeatureDecoderConfig:
    """MLP decoder from slots to per-patch targets with alpha masks.

    `target`: `encoder` reconstructs the (frozen) encoder's features; `rgb` reconstructs the
    frame's pixels of each patch, a fixed target for a trainable encoder.
    `position_embedding`: `learned` (one free vector per patch, DINOSAUR/SlotContrast) or
    `fourier` (fixed sines and cosines of the patch's (y, x), up to `fourier_max_frequency`
    periods across the frame): a smooth embedding that makes each slot's alpha a smooth blob,
    as a spatial-broadcast decoder's, which speeds up object discovery from pixels.
    """

    target: str = "encoder"
    hidden_dims: list[int] = field(default_factory=lambda: [1024, 1024, 1024])
    position_embedding: str = "learned"
    fourier_max_frequency: float = 4.0


@dataclass
class PointmapDecoderConfig:
    """Per-slot pointmap decoder (XYZ + alpha at `model.decoder_resolution`).

    `frame`: `world` predicts points in the clip's first-camera frame, conditioned on the camera
    pose when `pose_conditioned` (the reference); `camera` predicts each frame's points in its
    own camera, and the teacher's poses carry them into the first-camera frame (no pose input
    needed; also works on clips of one frame).
    `architecture`: `conv` (the reference's: a coarse token grid upsampled by convolutions;
    `token_dim`, `num_upsamples`, `min_channels`) or `mlp` (the feature decoder's form, one
    MLP output per cell of the grid, masks as sharp as the grid; `hidden_dims`,
    `position_embedding`, `fourier_max_frequency` as in `FeatureDecoderConfig`).
    """

    frame: str = "world"
    pose_conditioned: bool = True
    architecture: str = "conv"
    token_dim: int = 256
    num_upsamples: int = 4
    min_channels: int = 32
    hidden_dims: list[int] = field(default_factory=lambda: [256, 256])
    position_embedding: str = "learned"
    fourier_max_frequency: float = 4.0


@dataclass
class ModelConfig:
    num_slots: int = 7
    slot_dim: int = 64
    num_iterations: int = 2
    decoder_resolution: list[int] = field(default_factory=lambda: [128, 128])
    learning_rate: float = 4e-4
    weight_decay: float = 0.0
    visualize: bool = True
    visualize_every_n_steps: int | None = None
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    slots: SlotModuleConfig = field(default_factory=SlotModuleConfig)
    feature_decoder: FeatureDecoderConfig = field(default_factory=FeatureDecoderConfig)
    pointmap_decoder: PointmapDecoderConfig = field(default_factory=PointmapDecoderConfig)


@dataclass
class LossConfig:
    """Weights of the loss terms (0 turns a term off, and its decoder is not built).

    The pointmap term is scale-invariant with one scale per clip (the frames keep their relative
    scale). With a teacher confidence C (TTT3R) and `pointmap_confidence=true` it is DUSt3R's
    `C·d − confidence_alpha·log C` with C clipped to `max_confidence`: bounded weights, unlike
    the reference's raw `1 + exp(x)`.
    """

    feature_weight: float = 1.0
    pointmap_weight: float = 1.0
    contrastive_weight: float = 0.5
    contrastive_temperature: float = 0.1
    pointmap_confidence: bool = True
    confidence_alpha: float = 0.2
    max_confidence: float = 10.0


@dataclass
class SyntheticConfig:
    """The generated dataset used when `dataset.name=synthetic`: generated once into
    `dataset.root` (default: ./data/synthetic-<hash of these settings>). The scene knobs are
    post3r_data's `SynthConfig` fields."""

    num_train_videos: int = 512
    num_val_videos: int = 32
    num_frames: int = 8
    resolution: int = 64
    seed: int = 0
    videos_per_shard: int = 32
    min_objects: int = 3
    max_objects: int = 6
    shapes: list[str] = field(default_factory=lambda: ["sphere", "box", "cylinder"])
    textures: bool = True
    texture_contrast: float = 0.35
    object_motion: float = 1.0
    camera_motion: float = 1.0
    shadows: bool = True
    random_lighting: bool = True
    fov_degrees: float = 50.0


@dataclass
class DatasetConfig:
    """Shards `<root>/<name>-{train,validation}-NNNNNN.tar` (SlotContrast's naming).

    `root`: the data directory (`--data-dir` sets it). `name`: the shards' dataset prefix
    (`synthetic`, `ytvis`, `movi_c`, ...); `synthetic` shards are generated when missing.
    `chunk_size`: frames per training clip. `train_resampling`: draw shards with replacement, an
    endless stream (SlotContrast's choice; the only mode post3r_data's loader has, so it must
    stay true). `val_chunk_size`: cut validation videos into clips of this many frames (null:
    whole videos; they must then share a length to be batched). `image_size`: frames are
    cropped and resized to this square size (null: the synthetic resolution).
    """

    name: str = "synthetic"
    root: str | None = None
    batch_size: int = 8
    val_batch_size: int = 4
    num_workers: int = 0
    chunk_size: int = 4
    train_resampling: bool = True
    val_chunk_size: int | None = None
    image_size: int | None = None
    shuffle_buffer: int = 100
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class RunConfig:
    experiment: str = "post3r"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # lr and weight decay follow the original keys model.learning_rate / model.weight_decay.
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            lr="${model.learning_rate}",  # type: ignore[arg-type]
            weight_decay="${model.weight_decay}",  # type: ignore[arg-type]
        )
    )


def resolve_config_path(name: str | os.PathLike | None) -> Path:
    """A config given as a path, or as the name of one of post3r_train's configs (`smoke`,
    `ytvis2021.yaml`; see `CONFIG_DIR`)."""
    if name is None:
        name = "default"
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / path, CONFIG_DIR / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    raise ConfigError(
        f"config {str(name)!r} not found: give a YAML file path or one of {', '.join(known)}"
    )


def load_config(
    config: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> DictConfig:
    """The schema, merged with the YAML file `config` (default: configs/default.yaml), then with
    `key=value` overrides; validated. Interpolations are left in (see `resolved`)."""
    cfg = OmegaConf.structured(RunConfig)
    path = resolve_config_path(config)
    try:
        loaded = OmegaConf.load(path)
    except Exception as error:  # YAML syntax errors come in several exception types
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    cfg = _merge(cfg, loaded, f"{path}")
    cfg = _merge(cfg, _parse_overrides(overrides), "override")
    validate(cfg)
    return cfg


def _parse_overrides(overrides: list[str] | tuple[str, ...]) -> DictConfig:
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value (e.g. model.num_slots=7)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as error:
        raise ConfigError(f"could not parse overrides {list(overrides)}: {error}") from error


def _merge(cfg: DictConfig, other: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, other)  # type: ignore[return-value]
    except ConfigKeyError as error:
        raise ConfigError(_unknown_key_message(error, source)) from error
    except ValidationError as error:
        key = error.full_key or "?"
        raise ConfigError(
            f"{source}: bad value for {key}: {str(error.msg).splitlines()[0]}"
        ) from error


def _unknown_key_message(error: ConfigKeyError, source: str) -> str:
    key = error.full_key or str(error)
    valid = sorted(flat_keys(OmegaConf.structured(RunConfig)))
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # a misspelt last part under the right section
        leaf = key.rsplit(".", 1)[-1]
        leaves = {k.rsplit(".", 1)[-1]: k for k in valid}
        close = [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=1)]
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"{source}: unknown config key {key!r}{hint}"


def flat_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every leaf key of `cfg` in dotted form (free-form dicts count as leaves)."""
    keys = []
    for key in cfg:
        full = prefix + str(key)
        node = cfg._get_node(key)  # avoids resolving interpolations
        if isinstance(node, DictConfig) and node._metadata.object_type not in (None, dict):
            keys += flat_keys(node, f"{full}.")
        else:
            keys.append(full)
    return keys


def validate(cfg: DictConfig) -> None:
    """Check what the types cannot: choices, ranges and combinations, naming the key."""
    m, d = cfg.model, cfg.dataset
    require_one_of(m.encoder.name, ENCODERS, "model.encoder.name")
    require_one_of(m.teacher.name, TEACHERS, "model.teacher.name")
    require_one_of(m.feature_decoder.target, FEATURE_TARGETS, "model.feature_decoder.target")
    require_one_of(m.slots.grouper, GROUPERS, "model.slots.grouper")
    require_one_of(m.slots.initializer, INITIALIZERS, "model.slots.initializer")
    require_positive(m.slots.heads, "model.slots.heads")
    if m.slots.init_noise_std < 0:
        raise ConfigError(f"model.slots.init_noise_std must be >= 0, got {m.slots.init_noise_std}")
    if m.slots.init_noise_std > 0 and m.slots.initializer != "fixed":
        raise ConfigError(
            "model.slots.init_noise_std adds noise to the fixed learned slots: set "
            "model.slots.initializer=fixed (gaussian already samples its slots)"
        )
    if m.slots.grouper == "recurrent":
        heads = m.slots.heads or max(1, m.slot_dim // 64)
        if m.slot_dim % heads or (m.slot_dim // heads) % 4:
            raise ConfigError(
                f"model.slots.grouper=recurrent uses 2D RoPE: model.slot_dim / model.slots.heads "
                f"must be a multiple of 4, got slot_dim={m.slot_dim}, heads={heads}"
            )
    require_one_of(m.pointmap_decoder.frame, POINTMAP_FRAMES, "model.pointmap_decoder.frame")
    architecture = m.pointmap_decoder.architecture
    require_one_of(architecture, POINTMAP_ARCHITECTURES, "model.pointmap_decoder.architecture")
    for decoder in ("feature_decoder", "pointmap_decoder"):
        key = f"model.{decoder}.position_embedding"
        require_one_of(m[decoder].position_embedding, POSITION_EMBEDDINGS, key)
    require_one_of(m.slots.predictor, PREDICTORS, "model.slots.predictor")
    require_one_of(m.teacher.update_rule, UPDATE_RULES, "model.teacher.update_rule")
    require_positive(m.teacher.cache_resolution, "model.teacher.cache_resolution")
    for key in ("num_slots", "slot_dim", "num_iterations", "learning_rate"):
        require_positive(m[key], f"model.{key}")
    for key in ("batch_size", "val_batch_size", "chunk_size"):
        require_positive(d[key], f"dataset.{key}")
    if not d.train_resampling:
        raise ConfigError(
            "dataset.train_resampling=false is not supported: the training stream draws shards "
            "with replacement (post3r_data.make_train_loader); leave it true"
        )
    if d.name != "synthetic" and d.image_size is None:
        raise ConfigError(f"set dataset.image_size for dataset.name={d.name} (e.g. 518)")
    if d.chunk_size < 2 and m.slots.predictor != "none":
        raise ConfigError(
            "dataset.chunk_size must be >= 2 with a predictor (it learns from frame t to t+1; "
            "with one frame it would get no gradient), or set model.slots.predictor=none"
        )
    if d.chunk_size < 2 and cfg.loss.contrastive_weight > 0:
        raise ConfigError(
            "loss.contrastive_weight > 0 compares slots of consecutive frames: set "
            "dataset.chunk_size >= 2, or loss.contrastive_weight=0"
        )
    if d.num_workers < 0:
        raise ConfigError(f"dataset.num_workers must be >= 0, got {d.num_workers}")
    if len(m.decoder_resolution) != 2 or min(m.decoder_resolution) < 1:
        raise ConfigError(
            f"model.decoder_resolution must be [height, width], got {list(m.decoder_resolution)}"
        )
    if m.encoder.name == "ttt3r" and m.teacher.name != "ttt3r":
        raise ConfigError(
            "model.encoder.name=ttt3r uses the TTT3R teacher's encoder tokens: "
            "also set model.teacher.name=ttt3r"
        )
    if m.encoder.name == "patch" and m.feature_decoder.target == "encoder":
        raise ConfigError(
            "model.encoder.name=patch is trainable: reconstructing its own features collapses; "
            "set model.feature_decoder.target=rgb"
        )
    if cfg.loss.feature_weight <= 0 and (m.teacher.name == "none" or cfg.loss.pointmap_weight <= 0):
        raise ConfigError("no reconstruction loss: set loss.feature_weight or loss.pointmap_weight")
    try:
        trainer_config(cfg).validate()
        optim_config(cfg).validate()
    except ValueError as error:
        raise ConfigError(str(error)) from error


def resolved(cfg: DictConfig) -> DictConfig:
    """A copy with every interpolation replaced by its value (what a run directory records)."""
    copy = cfg.copy()
    OmegaConf.resolve(copy)
    return copy


def frame_size(cfg: DictConfig) -> int:
    """The side of the square frames the model sees: `dataset.image_size`, or the synthetic
    resolution."""
    size = cfg.dataset.image_size
    if size is None and cfg.dataset.name == "synthetic":
        size = cfg.dataset.synthetic.resolution
    if size is None:
        raise ConfigError(
            f"set dataset.image_size: frames of {cfg.dataset.name} are resized to it "
            "(518 for DINOv2 ViT-B/14 as in the reference)"
        )
    return int(size)


def trainer_config(cfg: DictConfig) -> TrainerConfig:
    return OmegaConf.to_object(resolved(cfg).trainer)  # type: ignore[return-value]


def optim_config(cfg: DictConfig) -> OptimConfig:
    return OmegaConf.to_object(resolved(cfg).optim)  # type: ignore[return-value]
