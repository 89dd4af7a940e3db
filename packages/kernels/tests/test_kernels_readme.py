"""The README's Python examples run as written (in a scratch registry: one registers a name)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from post3r_kernels import dispatch, rope2d_impls

README = Path(__file__).parents[1] / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_the_registration_and_usage_examples() -> None:
    assert len(EXAMPLES) == 2


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index: int, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(dispatch, "_REGISTRY", dict(dispatch._REGISTRY))
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    exec(compile(EXAMPLES[index], f"{README}[example {index}]", "exec"), {})
    if "register_rope2d_impl" in EXAMPLES[index]:
        assert "float64" in rope2d_impls()
        assert capsys.readouterr().out.strip() == "tensor(0.)"  # zero positions: identity
