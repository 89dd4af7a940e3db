"""The implementation switch, the registry and the argument checks."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import post3r_kernels
from post3r_kernels import dispatch, register_rope2d_impl, resolve_rope2d_impl, rope2d, rope2d_impls

X = torch.randn(2, 3, 5, 8)
POS = torch.randint(-1, 6, (2, 5, 2))


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A scratch registry with a recording implementation named "spy"; restored afterwards."""
    monkeypatch.setattr(dispatch, "_REGISTRY", dict(dispatch._REGISTRY))
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    calls: list[str] = []

    def spy(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
        calls.append(f"spy base={base}")
        return post3r_kernels.rope2d_torch(x, positions, base)

    register_rope2d_impl("spy", spy)
    return calls


def test_argument_selects_a_registered_implementation(registry: list[str]) -> None:
    out = rope2d(X, POS, base=10, impl="spy")
    assert registry == ["spy base=10.0"]
    torch.testing.assert_close(out, rope2d(X, POS, base=10, impl="torch"))


def test_env_var_selects_and_argument_overrides(
    registry: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POST3R_ROPE2D_IMPL", "spy")
    rope2d(X, POS)
    assert registry == ["spy base=100.0"]
    rope2d(X, POS, impl="torch")
    assert len(registry) == 1
    assert resolve_rope2d_impl(None, X) == "spy"
    assert resolve_rope2d_impl("torch", X) == "torch"


def test_unknown_names_fail_clearly(registry: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"unknown rope2d implementation 'cuda'.*torch.*triton"):
        rope2d(X, POS, impl="cuda")
    monkeypatch.setenv("POST3R_ROPE2D_IMPL", "trition")
    with pytest.raises(ValueError, match=r"'trition' \(from POST3R_ROPE2D_IMPL\)"):
        rope2d(X, POS)
    with pytest.raises(TypeError, match="impl must be a string"):
        rope2d(X, POS, impl=1)  # type: ignore[arg-type]


def test_auto_picks_eager_on_cpu(registry: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_rope2d_impl(None, X) == "eager"
    assert resolve_rope2d_impl("auto", X) == "eager"
    monkeypatch.setenv("POST3R_ROPE2D_IMPL", "auto")
    assert resolve_rope2d_impl(None, X) == "eager"
    assert resolve_rope2d_impl(None, torch.empty(1, 1, 1, 4, device="meta")) == "eager"


def test_auto_picks_triton_for_gpu_tensors_when_installed(registry: list[str]) -> None:
    gpu_like = torch.empty(1, 1, 1, 4, device="meta")
    # The decision reads only device type, dtype and whether triton is importable.
    assert dispatch.auto_impl(gpu_like) == "eager"
    fake_cuda = type("FakeCuda", (), {"device": torch.device("cuda"), "dtype": torch.bfloat16})()
    expected = "triton" if dispatch.TRITON_INSTALLED else "eager"
    assert dispatch.auto_impl(fake_cuda) == expected  # type: ignore[arg-type]
    fake_cuda.dtype = torch.float64
    assert dispatch.auto_impl(fake_cuda) == "eager"  # type: ignore[arg-type]


def test_registry_rejects_bad_registrations(registry: list[str]) -> None:
    assert rope2d_impls()[:4] == ("torch", "triton", "compiled", "eager")
    assert "spy" in rope2d_impls() and rope2d_impls()[-1] == "auto"
    with pytest.raises(ValueError, match="already registered"):
        register_rope2d_impl("spy", post3r_kernels.rope2d_torch)
    register_rope2d_impl("spy", post3r_kernels.rope2d_torch, overwrite=True)
    rope2d(X, POS, impl="spy")
    assert registry == []
    with pytest.raises(ValueError, match="other than 'auto'"):
        register_rope2d_impl("auto", post3r_kernels.rope2d_torch)
    with pytest.raises(ValueError, match="non-empty string"):
        register_rope2d_impl("", post3r_kernels.rope2d_torch)
    with pytest.raises(TypeError, match="must be callable"):
        register_rope2d_impl("broken", None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("x", "positions", "base", "error", "message"),
    [
        (X.numpy(), POS, 100.0, TypeError, r"x must be a torch.Tensor of shape \(B, H, N, D\)"),
        (X[0], POS, 100.0, ValueError, r"x must have shape \(B, H, N, D\), got \(3, 5, 8\)"),
        (X[..., :6], POS, 100.0, ValueError, "head dim D=6 must be a positive multiple of 4"),
        (X.long(), POS, 100.0, TypeError, "x must be float16, bfloat16, float32 or float64"),
        (X, POS.float(), 100.0, TypeError, "positions must be an integer tensor.*float32"),
        (X, POS.bool(), 100.0, TypeError, "positions must be an integer tensor.*bool"),
        (X, POS[:, :4], 100.0, ValueError, r"positions must have shape \(B, N, 2\) = \(2, 5, 2\)"),
        (X, POS[..., :1], 100.0, ValueError, r"got \(2, 5, 1\)"),
        (X, POS.tolist(), 100.0, TypeError, "positions must be an integer torch.Tensor"),
        (X, POS.to("meta"), 100.0, ValueError, "positions is on meta but x is on cpu"),
        (X, POS, 0.0, ValueError, "base must be a finite positive number"),
        (X, POS, float("nan"), ValueError, "base must be a finite positive number"),
        (X, POS, "100", TypeError, "base must be a real number"),
    ],
)
def test_bad_inputs_name_the_argument_and_expected_form(x, positions, base, error, message) -> None:
    for impl in ("torch", "triton"):
        with pytest.raises(error, match=message):
            rope2d(x, positions, base, impl=impl)


def test_triton_impl_on_cpu_without_interpreter_says_what_to_do() -> None:
    pytest.importorskip("triton")
    from post3r_kernels import triton_rope2d

    if triton_rope2d.interpreter_active():
        pytest.skip("TRITON_INTERPRET=1 is set: the Triton path runs on CPU here")
    with pytest.raises(ValueError, match=r"needs x on a CUDA or ROCm device.*impl='torch'"):
        rope2d(X, POS, impl="triton")
    with pytest.raises(TypeError, match="use impl='torch' for float64"):
        rope2d(X.double(), POS, impl="triton")


NO_TRITON_SCRIPT = textwrap.dedent(
    """
    import sys

    sys.modules["triton"] = None  # what importlib sees where triton is not installed
    import torch
    import post3r_kernels  # would fail here if the package imported triton eagerly
    from post3r_kernels import rope2d, resolve_rope2d_impl

    x, pos = torch.randn(1, 2, 3, 8), torch.zeros(1, 3, 2, dtype=torch.long)
    torch.testing.assert_close(rope2d(x, pos), x)
    assert resolve_rope2d_impl("auto", x) == "eager"
    try:
        rope2d(x, pos, impl="triton")
    except RuntimeError as error:
        assert "needs the triton package" in str(error), error
    else:
        raise AssertionError("impl='triton' without triton did not fail")
    print("ok")
    """
)


def test_package_imports_and_runs_without_triton() -> None:
    result = subprocess.run(
        [sys.executable, "-c", NO_TRITON_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("clang++") is None,
    reason="torch.compile on CPU needs a C++ compiler",
)
def test_compiled_impl_matches_reference_forward_and_backward() -> None:
    x = torch.randn(1, 2, 6, 8, requires_grad=True)
    positions = torch.tensor([[[-1, -1], [0, 0], [0, 1], [1, 0], [1, 1], [5, 9]]])
    grad = torch.randn(1, 2, 6, 8)
    out = rope2d(x, positions, impl="compiled")
    (dx,) = torch.autograd.grad(out, x, grad)
    expected = rope2d(x, positions, impl="torch")
    (expected_dx,) = torch.autograd.grad(expected, x, grad)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(dx, expected_dx)


def test_dispatch_traces_into_one_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checks, env var lookup and registry dispatch must not break torch.compile graphs."""
    monkeypatch.setenv("POST3R_ROPE2D_IMPL", "torch")
    compiled = torch.compile(lambda x, pos: rope2d(x, pos) * 2, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(X, POS), rope2d(X, POS, impl="torch") * 2)
