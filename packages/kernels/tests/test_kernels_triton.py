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
