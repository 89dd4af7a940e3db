"""The torch reference against the original code's outputs, a brute-force loop, and gradcheck."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from post3r_kernels import rope2d, rope2d_torch

FIXTURES = Path(__file__).parent / "fixtures"
INPUTS = torch.load(FIXTURES / "inputs.pt", weights_only=True)
EXPECTED = torch.load(FIXTURES / "expected.pt", weights_only=True)
FLOAT32_CASES = [name for name, case in INPUTS.items() if case["tokens"].dtype == torch.float32]


def brute_force_rope2d(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """One pair at a time in float64 Python math: the definition, written as plainly as possible."""
    batch, heads, tokens, dim = x.shape
    quarter = dim // 4
    out = x.double().clone()
    for b in range(batch):
        for n in range(tokens):
            for axis in range(2):  # 0: y rotates dims [0, D/2), 1: x rotates [D/2, D)
                pos = int(positions[b, n, axis])
                for j in range(quarter):
                    angle = pos * base ** (-j / quarter)
                    c, s = math.cos(angle), math.sin(angle)
                    first, second = axis * 2 * quarter + j, axis * 2 * quarter + j + quarter
                    for h in range(heads):
                        u, v = float(x[b, h, n, first]), float(x[b, h, n, second])
                        out[b, h, n, first] = u * c - v * s
                        out[b, h, n, second] = v * c + u * s
    return out


@pytest.mark.parametrize("name", FLOAT32_CASES)
def test_torch_matches_original_outputs_and_gradients(name: str) -> None:
    case, expected = INPUTS[name], EXPECTED[name]
    tokens = case["tokens"].clone().requires_grad_()
    out = rope2d(tokens, case["positions"], case["base"], impl="torch")
    (out * case["w"]).sum().backward()
    torch.testing.assert_close(out, expected["out"], rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(tokens.grad, expected["grad"], rtol=1e-6, atol=2e-6)


def test_torch_half_input_is_float32_math_with_half_result() -> None:
    case, expected = INPUTS["fp16_grid_d64"], EXPECTED["fp16_grid_d64"]
    out = rope2d(case["tokens"], case["positions"], case["base"], impl="torch")
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, expected["out"], rtol=0, atol=1e-3)
    # The original pure-PyTorch fallback computed in fp16 and is measurably further away.
    exact = rope2d(case["tokens"].float(), case["positions"], case["base"], impl="torch")
    ours = (out.float() - exact).abs().max()
    theirs = (expected["out_pure_pytorch_fp16"].float() - exact).abs().max()
    assert ours < theirs


@pytest.mark.parametrize("head_dim", [4, 12, 48])
def test_torch_matches_brute_force_loop(head_dim: int) -> None:
    generator = torch.Generator().manual_seed(head_dim)
    x = torch.randn(2, 2, 5, head_dim, generator=generator, dtype=torch.float64)
    positions = torch.randint(-7, 30, (2, 5, 2), generator=generator)
    positions[:, 0] = -1  # the pose token
    expected = brute_force_rope2d(x, positions, 100.0)
    torch.testing.assert_close(rope2d_torch(x, positions, 100.0), expected, rtol=1e-12, atol=1e-12)


def test_torch_strided_views_match_contiguous() -> None:
    batch, tokens, heads, dim = 2, 7, 3, 16
    qkv = torch.randn(batch, tokens, 3, heads, dim)
    positions = torch.randint(-1, 9, (batch, tokens, 2))
    for part in range(2):  # q and k as the backbone makes them: (B, N, H, D) slices, transposed
        view = qkv[:, :, part].transpose(1, 2)
        assert not view.is_contiguous()
        out = rope2d(view, positions, impl="torch")
        torch.testing.assert_close(out, rope2d(view.contiguous(), positions, impl="torch"))


def test_torch_gradcheck_float64() -> None:
    x = torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    positions = torch.tensor([[[-1, -1], [0, 0], [0, 3], [2, 1], [17, -4]]])
    assert torch.autograd.gradcheck(lambda t: rope2d(t, positions, impl="torch"), (x,))
    assert torch.autograd.gradgradcheck(lambda t: rope2d(t, positions, impl="torch"), (x,))


def test_rotation_preserves_pair_norms_and_inverts() -> None:
    x = torch.randn(2, 3, 6, 16, dtype=torch.float64)
    positions = torch.randint(-20, 20, (2, 6, 2))
    out = rope2d(x, positions, impl="torch")
    pairs = lambda t: t.unflatten(-1, (2, 2, 4)).pow(2).sum(-2)  # noqa: E731
    torch.testing.assert_close(pairs(out), pairs(x))
    # Rotating by -pos undoes it (the backward is this inverse rotation).
    torch.testing.assert_close(rope2d(out, -positions, impl="torch"), x)


def test_zero_positions_are_identity_and_output_is_new() -> None:
    x = torch.randn(1, 2, 4, 8)
    out = rope2d(x, torch.zeros(1, 4, 2, dtype=torch.int32), impl="torch")
    assert out.data_ptr() != x.data_ptr()
    torch.testing.assert_close(out, x)
