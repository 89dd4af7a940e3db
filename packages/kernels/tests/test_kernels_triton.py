"""Run the Triton cases (triton_kernel_cases.py) in a fresh process under Triton's CPU interpreter.

TRITON_INTERPRET is read when ``@triton.jit`` decorates, so it cannot be switched on inside this
pytest process (other tests may already have imported the kernels, and the setting would leak
into other packages' tests in the same xdist worker). A subprocess with its own environment is
isolated from both.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).parent / "triton_kernel_cases.py"


def test_triton_kernels_under_interpreter() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", str(CASES), "-q", "-p", "no:cacheprovider"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert " passed" in result.stdout and " failed" not in result.stdout, report


# (name, value) of the kernel's specialised arguments, as a JIT launch on a (B, N, H, D) view of
# 16-byte aligned bf16 storage would see them (unit head-dim stride, strides divisible by 16).
_CONSTEXPRS = {"QUARTER": 12, "BLOCK_Q": 16, "BLOCK_N": 16, "BLOCK_H": 8, "x_sd": 1, "o_sd": 1}
_DIVISIBLE = ("x_ptr", "out_ptr", "pos_ptr", "x_sb", "x_sh", "x_sn", "o_sb", "o_sh", "o_sn")
_INT_ARGS = ("n_tokens", "n_heads", "token_blocks", "heads_per_program", "p_sb", "p_sn", "p_sc")


@pytest.mark.parametrize(
    ("backend", "arch", "warp_size"),
    [("hip", "gfx942", 64), ("hip", "gfx90a", 64), ("cuda", 90, 32)],
)
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_kernel_compiles_for_rocm_and_cuda_without_a_gpu(
    backend: str, arch, warp_size: int
) -> None:
    """Lower the kernel to AMD GCN / PTX on the CPU: catches code that one vendor cannot compile."""
    pytest.importorskip(f"triton.backends.{'amd' if backend == 'hip' else 'nvidia'}")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from post3r_kernels import triton_rope2d

    if triton_rope2d.interpreter_active():
        pytest.skip("TRITON_INTERPRET=1 is set in this process: kernels are not compiled")
    kernel = triton_rope2d._rope2d_kernel
    names = list(kernel.arg_names)
    signature = {name: "constexpr" for name in names}
    signature.update({name: "i32" for name in (*_INT_ARGS, *_DIVISIBLE[3:])})
    signature.update(x_ptr="*bf16", out_ptr="*bf16", pos_ptr="*i64", log2_freq_step="fp32")
    constexprs = {(names.index(name),): value for name, value in _CONSTEXPRS.items()}
    constexprs[(names.index("INVERSE"),)] = backend == "hip"
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in _DIVISIBLE}
    source = ASTSource(kernel, signature, constexprs, attrs)
    compiled = triton.compile(source, target=GPUTarget(backend, arch, warp_size))
    binary = compiled.asm["hsaco" if backend == "hip" else "cubin"]
    assert len(binary) > 1000
    if backend == "hip":  # only the ROCm device library, no NVIDIA libdevice
        assert "__nv_" not in compiled.asm["llir"]
