"""Shared fixtures: the fixture directory, the weight-fill rule and the reference tiny model."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import pytest
import torch

from post3r_backbone import TTT3R, TTT3RConfig

FIXTURES = Path(__file__).parent / "fixtures"


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """e = max|actual - reference| / max|reference| (the fixture documentation's measure)."""
    difference = (actual.double() - reference.double()).abs().max()
    return (difference / reference.double().abs().max()).item()


def fill_value(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The fixture's deterministic weight for one state-dict key."""
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")))
    r = torch.randn(shape, generator=generator, dtype=torch.float32)
    if len(shape) >= 2:
        return r * (1.0 / math.sqrt(math.prod(shape[1:])))
    return 1.0 + 0.02 * r if key.endswith(".weight") else 0.02 * r


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run many small ops: one thread is faster and fair on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def rel_error():
    return relative_error


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_reference_keys() -> list[dict]:
    return json.loads((FIXTURES / "tiny" / "keys.json").read_text())["keys"]


@pytest.fixture(scope="session")
def tiny_reference_config() -> TTT3RConfig:
    kwargs = json.loads((FIXTURES / "tiny" / "config.json").read_text())["constructor_kwargs"]
    kwargs.pop("norm_layer")  # LayerNorm(eps=1e-6) is fixed in this implementation
    return TTT3RConfig.from_dict(kwargs)


@pytest.fixture(scope="session")
def tiny_reference_weights(tiny_reference_keys) -> dict[str, torch.Tensor]:
    """Weights of the fixture's tiny model, rebuilt from the fill rule (aliases share storage)."""
    weights: dict[str, torch.Tensor] = {}
    for entry in tiny_reference_keys:
        key = entry["key"]
        alias = entry.get("alias_of")
        weights[key] = weights[alias] if alias else fill_value(key, tuple(entry["shape"]))
    return weights


@pytest.fixture(scope="session")
def tiny_reference_model(tiny_reference_config, tiny_reference_weights) -> TTT3R:
    """The fixture's tiny model with the filled weights (66 M parameters, mostly DPT)."""
    with torch.device("meta"):
        model = TTT3R(tiny_reference_config)
    model.load_state_dict(tiny_reference_weights, strict=True, assign=True)
    return model.freeze()


@pytest.fixture
def tiny_model() -> TTT3R:
    """The `tiny` preset with seeded random weights (3 M parameters), frozen."""
    torch.manual_seed(0)
    return TTT3R(TTT3RConfig.preset("tiny")).freeze()


@pytest.fixture
def frames() -> torch.Tensor:
    """A seeded clip (B=2, T=3, 3, 48, 64) in [0, 1]."""
    return torch.rand(2, 3, 3, 48, 64, generator=torch.Generator().manual_seed(1))
