"""Triton RoPE2D against the torch reference; run by test_kernels_triton.py, not collected itself.

The file name does not match `test_*.py` on purpose. Triton decides between compiling and
interpreting when a kernel is decorated, so these cases need a process of their own:

* on CPU: `TRITON_INTERPRET=1 uv run pytest packages/kernels/tests/triton_kernel_cases.py`
  (what test_kernels_triton.py does in a subprocess);
* on a CUDA or ROCm GPU: the same command without `TRITON_INTERPRET` runs the compiled kernels,
  plus the GPU-only cases at the end (larger shapes, torch.compile, opcheck).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from post3r_kernels import rope2d
from post3r_kernels.triton_rope2d import LaunchConfig, interpreter_active, launch_rope2d

if interpreter_active():
    DEVICE = torch.device("cpu")
elif torch.cuda.is_available():
    DEVICE = torch.device("cuda")
else:
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)
ON_GPU = DEVICE.type == "cuda"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="compiled Triton needs a GPU")

# fp32: only angle rounding differs (in-kernel exp2 vs pow; GPU sin/cos), ~1e-6 per unit angle.
# Half types: one rounding of the result, which the interpreter truncates for bf16 (<= 1 ulp).
TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 3e-5},
    torch.float16: {"rtol": 1e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 2e-2},
}
FIXTURES = Path(__file__).parent / "fixtures"


def make_tokens(layout: str, shape: tuple[int, int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """(B, H, N, D) tokens stored as bhnd, bnhd (a transposed view) or a slice of a qkv tensor."""
    batch, heads, tokens, dim = shape
    if layout == "bhnd":
        return torch.randn(shape, device=DEVICE).to(dtype)
    if layout == "bnhd":
        return torch.randn(batch, tokens, heads, dim, device=DEVICE).to(dtype).transpose(1, 2)
    qkv = torch.randn(batch, tokens, 3, heads, dim, device=DEVICE).to(dtype)
    return qkv[:, :, 1].transpose(1, 2)  # k, as the backbone slices it


def scattered_positions(batch: int, tokens: int) -> torch.Tensor:
    """Arbitrary (not a grid) integer positions, negative ones included, pose token first."""
    positions = torch.randint(-8, 48, (batch, tokens, 2), device=DEVICE)
    positions[:, 0] = -1
    return positions


def forward_and_grad(impl: str, x: torch.Tensor, positions: torch.Tensor, grad: torch.Tensor):
    leaf = x.detach().requires_grad_()
    out = rope2d(leaf, positions, impl=impl)
    out.backward(grad)
    return out, leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["bhnd", "bnhd", "qkv"])
@pytest.mark.parametrize("head_dim", [8, 48, 64])
def test_triton_matches_torch(head_dim: int, layout: str, dtype: torch.dtype) -> None:
    torch.manual_seed(head_dim)
    x = make_tokens(layout, (2, 3, 13, head_dim), dtype)
    positions = scattered_positions(2, 13)
    grad = make_tokens(layout, tuple(x.shape), dtype)
    out, dx = forward_and_grad("triton", x, positions, grad)
    expected, expected_dx = forward_and_grad("torch", x, positions, grad)
    assert out.dtype == dtype and dx.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])
    torch.testing.assert_close(dx, expected_dx, **TOLERANCES[dtype])


def test_triton_matches_original_outputs() -> None:
    inputs = torch.load(FIXTURES / "inputs.pt", weights_only=True)
    expected = torch.load(FIXTURES / "expected.pt", weights_only=True)
    for name, case in inputs.items():
        tokens = case["tokens"].to(DEVICE)
        positions, weight = case["positions"].to(DEVICE), case["w"].to(DEVICE)
        out, grad = forward_and_grad("triton", tokens, positions, weight.to(tokens.dtype))
        torch.testing.assert_close(out.cpu(), expected[name]["out"], **TOLERANCES[tokens.dtype])
        if "grad" in expected[name]:
            torch.testing.assert_close(grad.cpu(), expected[name]["grad"], rtol=1e-5, atol=3e-5)


def test_int32_and_broadcast_positions() -> None:
    x = make_tokens("bnhd", (3, 2, 9, 16), torch.float32)
    shared = torch.randint(-3, 20, (1, 9, 2), device=DEVICE, dtype=torch.int32)
    positions = shared.expand(3, -1, -1)  # stride 0 over the batch: no copy
    torch.testing.assert_close(
        rope2d(x, positions, impl="triton"),
        rope2d(x, positions.long(), impl="torch"),
        **TOLERANCES[torch.float32],
    )


def test_head_groups_and_partial_tiles() -> None:
    # 5 heads in groups of 2 and 9 tokens in blocks of 4: every tile edge is partial; Q = 3 is
    # not a power of two, so the frequency lanes are masked as well.
    x = make_tokens("qkv", (2, 5, 9, 12), torch.float32)
    positions = scattered_positions(2, 9)
    config = LaunchConfig(block_n=4, block_h=2, num_warps=1)
    out = launch_rope2d(x, positions, 100.0, config=config)
    torch.testing.assert_close(out, rope2d(x, positions, impl="torch"), **TOLERANCES[torch.float32])
    back = launch_rope2d(out, positions, 100.0, inverse=True, config=config)
    torch.testing.assert_close(back, x, **TOLERANCES[torch.float32])


def test_other_base_and_output_layout() -> None:
    x = make_tokens("bnhd", (1, 4, 7, 32), torch.float32)
    positions = scattered_positions(1, 7)
    out = rope2d(x, positions, base=10000.0, impl="triton")
    torch.testing.assert_close(
        out, rope2d(x, positions, base=10000.0, impl="torch"), **TOLERANCES[torch.float32]
    )
    assert out.transpose(1, 2).is_contiguous()  # same (B, N, H, D) memory order as the input
    assert out.data_ptr() != x.data_ptr()


def test_empty_inputs() -> None:
    x = torch.randn(2, 3, 0, 8, device=DEVICE)
    out = rope2d(x, torch.zeros(2, 0, 2, dtype=torch.long, device=DEVICE), impl="triton")
    assert out.shape == (2, 3, 0, 8)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_model_sized_inputs(dtype: torch.dtype) -> None:
    x = make_tokens("qkv", (4, 12, 769, 64), dtype)
    positions = scattered_positions(4, 769)
    grad = torch.randn_like(x)
    out, dx = forward_and_grad("triton", x, positions, grad)
    expected, expected_dx = forward_and_grad("torch", x, positions, grad)
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])
    torch.testing.assert_close(dx, expected_dx, **TOLERANCES[dtype])


@gpu_only
def test_composes_with_torch_compile_without_graph_breaks() -> None:
    def attention_prologue(q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return rope2d(q * 2.0, positions, impl="triton").sum(-1)

    compiled = torch.compile(attention_prologue, fullgraph=True)
    x = make_tokens("bnhd", (2, 4, 33, 64), torch.float32).requires_grad_()
    positions = scattered_positions(2, 33)
    out = compiled(x, positions)
    (dx,) = torch.autograd.grad(out.sum(), x)
    expected = attention_prologue(x, positions)
    (expected_dx,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float32])
    torch.testing.assert_close(dx, expected_dx, **TOLERANCES[torch.float32])


@gpu_only
def test_custom_op_passes_opcheck() -> None:
    x = make_tokens("bnhd", (2, 3, 10, 16), torch.float32).requires_grad_()
    positions = scattered_positions(2, 10)
    torch.library.opcheck(
        torch.ops.post3r_kernels.rope2d_triton.default, (x, positions, 100.0, False)
    )


def test_any_strides_in_and_expanded_gradients() -> None:
    # Every other element of a wider head dim: the head dim itself is strided.
    wide = torch.randn(2, 3, 5, 32, device=DEVICE)
    x = wide[..., ::2].requires_grad_()
    positions = scattered_positions(2, 5)
    out = rope2d(x, positions, impl="triton")
    torch.testing.assert_close(out, rope2d(x, positions, impl="torch"), **TOLERANCES[torch.float32])
    # sum() hands the backward a gradient expanded with stride 0 everywhere.
    out.sum().backward()
    (expected,) = torch.autograd.grad(rope2d(x, positions, impl="torch").sum(), x)
    torch.testing.assert_close(x.grad, expected, **TOLERANCES[torch.float32])
