"""scripts/gpu-check.sh: its CPU form end to end (the table with every row), the parsers on the
tools' real output formats, and failed or timed-out steps turning into a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from post3r_train import gpu_check
from post3r_train.gpu_check import FAILED, OK, TIMEOUT, Step

ROPE2D_OUTPUT = """\
device: NVIDIA H200 (torch 2.15.0, triton 3.9.0) | reps=50
 B*T     N   H   D dtype      impl | fwd       µs   GB/s %copy ×torch  ×comp | fwd+bwd       µs   GB/s %copy ×torch  ×comp
                    bf16      copy | 3900.0 GB/s device copy
  32   768  16  64  bf16     torch | fwd    120.0  420.0  10.8   1.00      - | fwd+bwd    300.0  336.0   8.6   1.00      -
  32   768  16  64  bf16  compiled | fwd     40.0 1260.0  32.3   3.00   1.00 | fwd+bwd     90.0 1120.0  28.7   3.33   1.00
  32   768  16  64  bf16    triton | fwd     16.0 3150.0  80.8   7.50   2.50 | fwd+bwd     33.0 3054.5  78.3   9.09   2.73
"""  # noqa: E501 (bench-rope2d's own line width)

BACKBONE_OUTPUT = """\

ttt3r_512 on NVIDIA H200: 384x512 (HxW), batch 1, autocast bf16, 805.5 M parameters (3073 MiB), torch 2.15.0, 16 CPU threads
rule   frames  frames/s  ms/frame  peak MiB mem/first fps/cut3r
---------------------------------------------------------------
ttt3r      16      45.1      22.2      6120      1.00       n/a
ttt3r      64      44.8      22.3      6121      1.00       n/a
"""  # noqa: E501

HEADS_OUTPUT = """\

ttt3r_512 on NVIDIA H200: 384x512 (HxW), batch 1, autocast bf16, 805.5 M parameters (3073 MiB), torch 2.15.0, 16 CPU threads
DPT arithmetic, ttt3r rule (medians over runs; cpu: process CPU seconds per frame):
heads  frames      runs  frames/s  cpu s/fr  peak MiB faults/fr   fps/old   cpu/old   mem/old
---------------------------------------------------------------------------------------------
new        16         3    41.200      0.03      6100        12      1.21      0.85      0.93
plain      16         3    36.000      0.03      6500        12      1.06      0.95      0.99
old        16         3    34.000      0.04      6550        13      1.00      1.00      1.00
"""  # noqa: E501


def test_heads_rows_per_variant_against_the_heads_before() -> None:
    rows = gpu_check.parse_heads(HEADS_OUTPUT)
    assert [row.item for row in rows] == [
        "ttt3r_512 bf16 384x512 DPT heads new (now), 16 frames",
        "ttt3r_512 bf16 384x512 DPT heads plain (original's convolutions), 16 frames",
        "ttt3r_512 bf16 384x512 DPT heads old (before issue 18), 16 frames",
    ]
    assert rows[0].result == "41.2 frames/s (x1.21 of old), peak 6100 MiB (x0.93 of old)"
    assert gpu_check.parse_heads(BACKBONE_OUTPUT) == []  # the rules table is not this one


TRAIN_OUTPUT = """\
torch 2.15.0+cu132, 1 CPU threads
case                   device  batch BxTxHxW     steps/s  ms/step frozen %  peak GiB  train M
---------------------------------------------------------------------------------------------
ytvis2021 shapes       cuda    4x6x518x518          1.50    666.7     70.0      9.80    20.90
"""


@pytest.mark.slow
def test_cpu_form_runs_every_step_and_prints_one_table_with_all_rows() -> None:
    env = {**os.environ, "UV_NO_SYNC": "1"}
    command = ["bash", str(gpu_check.ROOT / "scripts/gpu-check.sh"), "--cpu-tiny"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1500, env=env)
    report = result.stdout[-5000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    table = result.stdout.split("GPU check summary:")[-1].splitlines()
    rows = [line.split() for line in table[3:] if line.strip()]
    found = {(row[0], row[1]) for row in rows}
    for step in ("kernels", "rope2d", "backbone", "heads", "train", "memory"):
        assert (step, OK) in found, report
    assert sum(row[0] == "backbone" for row in rows) == 2  # one row per sequence length
    assert sum(row[0] == "heads" for row in rows) == 3  # new, plain, old
    assert "passed" in next(line for line in table if line.startswith("kernels"))
    cached = [line for line in table if "cached" in line]
    assert cached, report  # the cached teacher is measured, or said to be missing


def test_rope2d_rows_take_the_triton_figures_with_copy_share_and_speedups() -> None:
    (row,) = gpu_check.parse_rope2d(ROPE2D_OUTPUT)
    assert row.item == "triton bf16 32x768x16x64"
    assert row.result == (
        "fwd 3.15e+03 GB/s = 80.8 % of copy, x7.50 torch, x2.50 compile | "
        "fwd+bwd 3.05e+03 GB/s = 78.3 % of copy, x9.09 torch, x2.73 compile"
    )


def test_backbone_rows_per_length_and_train_rows_with_samples_per_second() -> None:
    rows = gpu_check.parse_backbone(BACKBONE_OUTPUT)
    assert [row.item for row in rows] == [
        "ttt3r_512 bf16 384x512 ttt3r, 16 frames",
        "ttt3r_512 bf16 384x512 ttt3r, 64 frames",
    ]
    assert rows[1].result == "44.8 frames/s, peak 6121 MiB (x1.00 of the shortest)"
    (train,) = gpu_check.parse_train(TRAIN_OUTPUT)
    assert train.item == "ytvis2021 shapes b4 t6 518x518"
    assert train.result == "1.50 steps/s, 6.0 samples/s, peak 9.80 GiB"


# bench-train --compare-teachers (issue 13): one row per teacher.
COMPARE_OUTPUT = """\
step time on cuda: the config's real sizes, random frozen weights (checkpoint files absent or CPU)
teacher   steps/s  samples/s      peak GiB TFLOP/step at 4x6x518px
------------------------------------------------------------------
online      0.800       3.20         10.50                      49.7
cached      3.100      12.40          4.25                      9.12
"""


def test_compare_teachers_rows() -> None:
    online, cached = gpu_check.parse_train(COMPARE_OUTPUT)
    assert (online.item, cached.item) == ("online teacher", "cached teacher")
    assert cached.result == (
        "3.10 steps/s, 12.4 samples/s, peak 4.25 GiB, 9.12 TFLOP/step at the config's sizes"
    )
    on_cpu = COMPARE_OUTPUT.replace("    peak GiB", "peak RSS GiB")
    assert "4.25 GiB (the process's RSS)" in gpu_check.parse_train(on_cpu)[1].result


def python_step(name: str, code: str, timeout_s: float = 60) -> Step:
    return Step(name, [sys.executable, "-c", code], timeout_s, gpu_check.parse_pytest(name, "case"))


def test_failed_and_timed_out_steps_are_rows_and_the_others_still_run() -> None:
    steps = [
        python_step("fails", "print('3 passed, 1 failed'); raise SystemExit(1)"),
        python_step("hangs", "import time; print('1 passed', flush=True); time.sleep(60)", 1),
        python_step("passes", "print('2 passed in 0.1s')"),
    ]
    outcomes = gpu_check.run_steps(steps, [], scale=1.0)
    statuses = [[row.status for row in gpu_check.rows_of(o)] for o in outcomes]
    assert statuses == [[FAILED, FAILED], [OK, TIMEOUT], [OK]]
    assert outcomes[1].seconds < 30  # killed at its limit, not after the sleep
    table = gpu_check.format_table("title", outcomes)
    assert "exit 1: 3 passed, 1 failed" in table and "TIMEOUT" in table


def test_main_exits_1_when_a_step_fails(monkeypatch, capsys) -> None:
    failing = python_step("kernels", "raise SystemExit(3)")
    monkeypatch.setattr(gpu_check, "tiny_steps", lambda: [failing])
    monkeypatch.setattr(gpu_check, "estimate_steps", lambda tiny: [python_step("memory", "pass")])
    assert gpu_check.main(["--cpu-tiny"]) == 1
    out = capsys.readouterr().out
    assert "GPU check summary" in out and "exit 3" in out


def test_without_a_gpu_the_gpu_form_says_how_to_run_the_cpu_form(capsys) -> None:
    if gpu_check.torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main([])
    assert exit_.value.code == 2 and "--cpu-tiny" in capsys.readouterr().err
