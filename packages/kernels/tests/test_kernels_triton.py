"""Run the Triton cases (triton_kernel_cases.py) in a fresh process under Triton's CPU interpreter.

TRITON_INTERPRET is read when `@triton.jit` decorates, so it cannot be switched on inside this
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
    # Only the compiled-GPU cases may be skipped: a skip anywhere else would hide a kernel path.
    skips = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    assert all("compiled Triton needs a GPU" in line for line in skips), report


# How a JIT launch on a (B, N, H, D) view of 16-byte aligned storage specialises the arguments:
# unit head-dim stride, pointers and other strides divisible by 16.
_DIVISIBLE = ("x_ptr", "out_ptr", "pos_ptr", "x_sb", "x_sh", "x_sn", "o_sb", "o_sh", "o_sn")
_INT_ARGS = ("n_tokens", "n_heads", "token_blocks", "heads_per_program", "p_sb", "p_sn", "p_sc")


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize(
    ("backend", "arch", "dtype", "quarter", "inverse", "vector_load"),
    [
        ("hip", "gfx942", "bf16", 16, False, "global_load_dwordx4"),  # MI300, D = 64
        ("hip", "gfx90a", "fp32", 12, True, None),  # MI200, D = 48, backward
        ("cuda", 90, "bf16", 16, False, "ld.global.v4.b32"),  # H100/H200, D = 64
    ],
)
def test_kernel_compiles_for_rocm_and_cuda_without_a_gpu(
    backend: str, arch, dtype: str, quarter: int, inverse: bool, vector_load: str | None
) -> None:
    """Lower the kernel to AMD GCN / PTX on the CPU: catches code one vendor cannot compile, and
    checks that the head dim is read with 16-byte vector loads."""
    pytest.importorskip(f"triton.backends.{'amd' if backend == 'hip' else 'nvidia'}")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from post3r_kernels import triton_rope2d

    if triton_rope2d.interpreter_active():
        pytest.skip("TRITON_INTERPRET=1 is set in this process: kernels are not compiled")
    kernel = triton_rope2d._rope2d_kernel
    warp_size = 64 if backend == "hip" else 32
    config = triton_rope2d.default_config(quarter, warp_size)
    names = list(kernel.arg_names)
    signature = {name: "constexpr" for name in names}
    signature.update({name: "i32" for name in (*_INT_ARGS, *_DIVISIBLE[3:])})
    signature.update(x_ptr=f"*{dtype}", out_ptr=f"*{dtype}", pos_ptr="*i64", log2_freq_step="fp32")
    constexprs = {
        "QUARTER": quarter,
        "BLOCK_Q": triton.next_power_of_2(quarter),
        "BLOCK_N": config.block_n,
        "BLOCK_H": config.block_h,
        "INVERSE": inverse,
        "x_sd": 1,
        "o_sd": 1,
    }
    source = ASTSource(
        kernel,
        signature,
        {(names.index(name),): value for name, value in constexprs.items()},
        {(names.index(name),): [["tt.divisibility", 16]] for name in _DIVISIBLE},
    )
    target = GPUTarget(backend, arch, warp_size)
    compiled = triton.compile(source, target=target, options={"num_warps": config.num_warps})
    assembly = compiled.asm["amdgcn" if backend == "hip" else "ptx"]
    assert len(compiled.asm["hsaco" if backend == "hip" else "cubin"]) > 1000
    if backend == "hip":  # only the ROCm device library, no NVIDIA libdevice
        assert "__nv_" not in compiled.asm["llir"]
    if vector_load:
        assert vector_load in assembly
