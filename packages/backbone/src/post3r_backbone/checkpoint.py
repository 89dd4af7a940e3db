"""Checkpoint I/O: original CUT3R/TTT3R `.pth` files (read safely) and safetensors (fast, mmap).

* `load_checkpoint(path)` builds the model a file describes and loads it strictly.
* `read_original_checkpoint(path)` returns the config and state dict of an original `.pth`,
  without `eval` and without executing anything from the pickle (see `safe_pickle`).
* `save_safetensors(model, path)` writes the weights plus the config (as metadata JSON),
  atomically. The 12 DPT alias keys of the original layout are stored once.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from post3r_backbone import safe_pickle
from post3r_backbone.config import (
    ORIGINAL_DEFAULTS,
    TTT3RConfig,
    config_from_constructor_string,
)
from post3r_backbone.errors import (
    TTT3RCheckpointError,
    TTT3RCheckpointNotFoundError,
    TTT3RConfigError,
)
from post3r_backbone.model import TTT3R
from post3r_io import atomic_path

RELEASED_CHECKPOINT = "cut3r_512_dpt_4_64.pth"
RELEASED_URL = "https://drive.google.com/file/d/1Asz-ZB3FfpzZYwunhQvNPZEUA8XUNAYD"
DEFAULT_CHECKPOINT_DIR = Path("checkpoints")
CHECKPOINT_ENV = "POST3R_BACKBONE_CHECKPOINT"
CONFIG_METADATA_KEY = "post3r_backbone.config"
_CONSTRUCTOR_PREFIX = "ARCroco3DStereo"


def default_checkpoint_path() -> Path:
    """`$POST3R_BACKBONE_CHECKPOINT` if set, else `checkpoints/cut3r_512_dpt_4_64.pth`."""
    return Path(os.environ.get(CHECKPOINT_ENV, DEFAULT_CHECKPOINT_DIR / RELEASED_CHECKPOINT))


def _require_file(path: Path) -> None:
    if path.is_file():
        return
    raise TTT3RCheckpointNotFoundError(
        f"TTT3R checkpoint not found: {path}\n"
        f"TTT3R uses CUT3R's released weights, {RELEASED_CHECKPOINT} (about 3.2 GB): download it "
        f"from the CUT3R release ({RELEASED_URL}, linked from the README of "
        "https://github.com/CUT3R/CUT3R; TTT3R's README points to the same file) and put it at "
        f"{DEFAULT_CHECKPOINT_DIR / RELEASED_CHECKPOINT} "
        f"(or set ${CHECKPOINT_ENV} / pass its path). "
        "Optionally convert it once for fast loading: "
        f"uv run apps/convert-checkpoint {DEFAULT_CHECKPOINT_DIR / RELEASED_CHECKPOINT} "
        f"{DEFAULT_CHECKPOINT_DIR / 'cut3r_512_dpt_4_64.safetensors'}"
    )


# --------------------------------------------------------------------------------------------
# Original .pth files


def read_original_checkpoint(
    path: str | Path, config: TTT3RConfig | None = None
) -> tuple[TTT3RConfig, dict[str, Tensor], list[str]]:
    """Config, state dict and the names of the other (ignored) entries of an original `.pth`.

    The config comes from the file's `args.model` string unless `config` is given.
    """
    path = Path(path)
    _require_file(path)
    contents = _torch_load_restricted(path)
    if not isinstance(contents, Mapping):
        raise TTT3RCheckpointError(
            f"{path}: expected a dict with 'args' and 'model', got {type(contents).__name__}"
        )
    if "model" not in contents or not isinstance(contents["model"], Mapping):
        raise TTT3RCheckpointError(
            f"{path}: no 'model' state dict in the checkpoint "
            f"(entries: {sorted(map(str, contents))}); "
            "an original CUT3R/TTT3R training checkpoint has 'model' and 'args'"
        )
    state_dict = _strip_module_prefix(dict(contents["model"]))
    ignored = sorted(str(key) for key in contents if key != "model")
    if config is not None:
        return config, state_dict, ignored
    constructor = find_constructor_string(contents.get("args"))
    if constructor is None:
        raise TTT3RCheckpointError(
            f"{path}: the 'args' entry holds no model constructor string "
            f"('{_CONSTRUCTOR_PREFIX}(ARCroco3DStereoConfig(...))'); "
            "pass config=... to load_checkpoint"
        )
    try:
        config = config_from_constructor_string(constructor)
    except TTT3RConfigError as error:
        raise TTT3RCheckpointError(
            f"{path}: cannot build the model its args describe: {error}"
        ) from None
    return config, state_dict, ignored


def _torch_load_restricted(path: Path) -> Any:
    """torch.load with the restricted pickle module; memory-mapped when the format allows it."""
    load = functools.partial(
        torch.load, path, map_location="cpu", weights_only=False, pickle_module=safe_pickle
    )
    try:
        try:
            return load(mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):  # legacy (non-zip) files cannot be memory-mapped
                raise
        return load()
    except Exception as error:  # a truncated zip, a corrupt pickle, not a checkpoint at all
        raise TTT3RCheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {error}); "
            "if it is a download, it may be incomplete: fetch it again"
        ) from None


def find_constructor_string(args: Any) -> str | None:
    """The `ARCroco3DStereo(...)` string in an unpickled `args` object (key 'model' first)."""
    candidates = [
        (where, text.strip())
        for where, text in safe_pickle.walk_strings(args)
        if text.strip().startswith(_CONSTRUCTOR_PREFIX)
    ]
    for where, text in candidates:
        if "model" in where:
            return text
    return candidates[0][1] if candidates else None


def _strip_module_prefix(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """DDP-saved files prefix every key with 'module.'."""
    if state_dict and all(key.startswith("module.") for key in state_dict):
        return {key[len("module.") :]: value for key, value in state_dict.items()}
    return state_dict


def to_constructor_string(config: TTT3RConfig) -> str:
    """The original constructor string for `config`.

    Fields the original constructor does not have are written only when they differ from the
    defaults, so a config of the original family gives a string the original code accepts.
    """
    defaults = TTT3RConfig()
    parts = []
    for name, value in config.to_dict().items():
        if name == "model_update_type":
            continue  # not a constructor argument in released checkpoints
        if name not in ORIGINAL_DEFAULTS and value == getattr(defaults, name):
            continue
        parts.append(f"{name}={_python_literal(value)}")
    return f"ARCroco3DStereo(ARCroco3DStereoConfig({', '.join(parts)}))"


def _python_literal(value: Any) -> str:
    if isinstance(value, tuple):
        inner = ", ".join(_python_literal(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    return repr(value)


def save_original_checkpoint(model: TTT3R, path: str | Path) -> None:
    """Write `model` in the original training-checkpoint layout ({'args', 'model'}), atomically.

    `args` is an `argparse.Namespace` whose `model` is the constructor string, which the
    original loader reads. Useful for tests and for running the original code on our weights.
    """
    import argparse

    contents = {
        "args": argparse.Namespace(model=to_constructor_string(model.config)),
        "model": model.state_dict(),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(path)) as tmp:
        torch.save(contents, tmp)


# --------------------------------------------------------------------------------------------
# Strict matching


def alias_keys(model: torch.nn.Module) -> dict[str, str]:
    """State-dict keys that name the same tensor as an earlier key: {alias: canonical}."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        canonical = first.setdefault(id(tensor), key)
        if canonical != key:
            aliases[key] = canonical
    return aliases


def match_state_dict(model: torch.nn.Module, provided: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The full state dict for `model` from `provided`; TTT3RCheckpointError on any mismatch.

    Of a key and its aliases (same tensor under two names) any one may be present.
    """
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    canonical = {key: key for key in expected} | alias_keys(model)
    found = {canonical[key]: value for key, value in provided.items() if key in canonical}
    missing = [key for key in expected if canonical[key] not in found]
    unexpected = [key for key in provided if key not in expected]
    misshaped = [
        f"{key}: checkpoint {tuple(value.shape)} vs model {expected[key]}"
        for key, value in provided.items()
        if key in expected and tuple(value.shape) != expected[key]
    ]
    not_float = [
        f"{key}: {value.dtype}"
        for key, value in provided.items()
        if key in expected and not value.is_floating_point()
    ]
    if missing or unexpected or misshaped or not_float:
        raise TTT3RCheckpointError(_mismatch_report(missing, unexpected, misshaped, not_float))
    return {key: found[canonical[key]] for key in expected}


def _mismatch_report(
    missing: list[str], unexpected: list[str], misshaped: list[str], not_float: list[str]
) -> str:
    lines = [
        "checkpoint does not match the model (is it a CUT3R/TTT3R checkpoint for this config?)"
    ]
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("mis-shaped keys", misshaped),
        ("non-floating-point tensors", not_float),
    ):
        if items:
            shown = "\n    ".join(items[:20])
            more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
            lines.append(f"  {len(items)} {title}:\n    {shown}{more}")
    return "\n".join(lines)


def build_model(
    config: TTT3RConfig, state_dict: Mapping[str, Tensor], dtype: torch.dtype = torch.float32
) -> TTT3R:
    """A TTT3R for `config` holding exactly `state_dict` (checked strictly); no random init."""
    with torch.device("meta"):
        model = TTT3R(config)
    full = match_state_dict(model, state_dict)
    full = {key: value.to(dtype) for key, value in full.items()}
    model.load_state_dict(full, strict=True, assign=True)
    return model.eval()


# --------------------------------------------------------------------------------------------
# safetensors


def save_safetensors(
    model: TTT3R, path: str | Path, state_dict: Mapping[str, Tensor] | None = None
) -> None:
    """Write weights (`state_dict` or the model's) and config metadata to `path` atomically."""
    aliases = alias_keys(model)
    tensors = state_dict if state_dict is not None else model.state_dict()
    tensors = {
        key: value.detach().contiguous() for key, value in tensors.items() if key not in aliases
    }
    metadata = {CONFIG_METADATA_KEY: model.config.to_json(), "format": "pt"}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(path)) as tmp:  # the project's rule: fsync, umask mode, rename
        save_file(tensors, tmp, metadata=metadata)


def read_safetensors(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[TTT3RConfig, dict[str, Tensor]]:
    """Config and tensors of a file from `save_safetensors` (memory-mapped, on `device`)."""
    path = Path(path)
    _require_file(path)
    try:
        with safe_open(path, framework="pt", device=str(device)) as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    except Exception as error:
        raise TTT3RCheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    if CONFIG_METADATA_KEY not in metadata:
        raise TTT3RCheckpointError(
            f"{path}: no '{CONFIG_METADATA_KEY}' metadata; write the file with "
            "`uv run apps/convert-checkpoint` or post3r_backbone.save_safetensors"
        )
    try:
        config = TTT3RConfig.from_json(metadata[CONFIG_METADATA_KEY])
    except TTT3RConfigError as error:
        raise TTT3RCheckpointError(f"{path}: invalid config metadata: {error}") from None
    return config, tensors


# --------------------------------------------------------------------------------------------
# One entry point


def load_checkpoint(
    path: str | Path,
    *,
    config: TTT3RConfig | None = None,
    device: str | torch.device = "cpu",
    model_update_type: str | None = None,
) -> TTT3R:
    """Load an original `.pth` or a converted `.safetensors` into the model it describes.

    The architecture comes from the file itself (`args.model` or the safetensors metadata)
    unless `config` is given. Loading is strict. `model_update_type` ("cut3r"/"ttt3r")
    overrides the update rule (default: the config's, "ttt3r" for original files).
    Returns the model on `device` in eval mode; call `.freeze()` for frozen use.
    """
    path = Path(path)
    _require_file(path)
    if path.suffix == ".safetensors":
        file_config, state_dict = read_safetensors(path, device)
    else:
        file_config, state_dict, _ = read_original_checkpoint(path, config)
    config = config if config is not None else file_config
    if model_update_type is not None:
        config = config.replace(model_update_type=model_update_type)
    try:
        model = build_model(config, state_dict)
    except TTT3RCheckpointError as error:
        raise TTT3RCheckpointError(f"{path}: {error}") from None
    return model.to(device)
