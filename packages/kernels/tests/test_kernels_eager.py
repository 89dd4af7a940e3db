"""The eager implementation against the original code's outputs, the reference and float64 math."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from post3r_kernels import rope2d, rope2d_eager, rope2d_torch

FIXTURES = Path(__file__).parent / "fixtures"
INPUTS = torch.load(FIXTURES / "inputs.pt", weights_only=True)
EXPECTED = torch.load(FIXTURES / "expected.pt", weights_only=True)


@pytest.mark.parametrize("name", sorted(INPUTS))
def test_eager_matches_original_outputs(name: str) -> None:
    case, expected = INPUTS[name], EXPECTED[name]
    out = rope2d(case["tokens"], case["positions"], case["base"], impl="eager")
    assert out.dtype == case["tokens"].dtype
    tolerance = 1e-3 if case["tokens"].dtype == torch.float16 else 2e-6
    torch.testing.assert_close(out, expected["out"], rtol=1e-6, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_eager_is_the_reference_bit_for_bit(dtype: torch.dtype) -> None:
    """Backbone-shaped q (a strided slice of a fused qkv); float64 math bounds both."""
    generator = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 48, 3, 4, 64, generator=generator).to(dtype)
    q = qkv[:, :, 0].transpose(1, 2)
    positions = torch.randint(-1, 40, (2, 48, 2), generator=generator)
    exact = rope2d_torch(q.double(), positions)
    eager, reference = rope2d_eager(q, positions), rope2d_torch(q, positions)
    assert eager.dtype == dtype and eager.shape == q.shape
    assert torch.equal(eager, reference)  # the same roundings in the same order
    # Angles are float32 in both: an angle of p radians is off by about p ulps.
    angle_error = (positions.abs().max() + 1) * torch.finfo(torch.float32).eps
    rounding = torch.finfo(dtype).eps + angle_error
    assert (eager.double() - exact).abs().max() <= 2 * rounding * exact.abs().amax()


def test_eager_float64_matches_the_reference() -> None:
    x = torch.randn(2, 3, 11, 12, dtype=torch.float64)
    positions = torch.randint(-5, 9, (2, 11, 2))
    torch.testing.assert_close(rope2d_eager(x, positions, 7.0), rope2d_torch(x, positions, 7.0))


def test_eager_leaves_its_input_alone_and_inverts() -> None:
    x = torch.randn(1, 2, 9, 16)
    before = x.clone()
    positions = torch.randint(0, 5, (1, 9, 2))
    back = rope2d_eager(rope2d_eager(x, positions), -positions)
    assert torch.equal(x, before)
    torch.testing.assert_close(back, x, atol=1e-6, rtol=1e-6)


def test_eager_gradients_pass_gradcheck_and_match_the_reference() -> None:
    x = torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    positions = torch.randint(-1, 6, (1, 5, 2))
    assert torch.autograd.gradcheck(lambda t: rope2d_eager(t, positions, 10.0), (x,))
    weights = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    (gradient,) = torch.autograd.grad((rope2d_eager(x, positions) * weights).sum(), x)
    (expected,) = torch.autograd.grad((rope2d_torch(x, positions) * weights).sum(), x)
    assert torch.equal(gradient, expected)
