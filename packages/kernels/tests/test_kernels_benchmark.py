"""The benchmark script runs end to end on CPU and rejects bad options (no timing is asserted)."""

from __future__ import annotations

import pytest

from post3r_kernels import benchmark


def test_benchmark_prints_a_row_per_implementation(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--device", "cpu", "--shapes", "1,10,2,8", "--dtypes", "fp32,bf16"]
    impls = ["--impls", "torch,eager,triton"]
    assert benchmark.main([*argv, *impls, "--reps", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "triton implementation needs a CUDA or ROCm GPU" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("   1    10")]
    assert [(row[4], row[5]) for row in rows] == [
        ("fp32", "torch"),
        ("fp32", "eager"),
        ("bf16", "torch"),
        ("bf16", "eager"),
    ]
    assert out.count("GB/s device copy") == 2
    for row in rows:  # times of forward and forward+backward, then their bandwidths
        assert float(row[8]) > 0 and float(row[15]) > 0
        assert float(row[9]) >= 0 and float(row[16]) >= 0


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--dtypes", "fp8"], "--dtypes: unknown ['fp8']"),
        (["--impls", "cuda"], "--impls: unknown ['cuda']"),
        (["--shapes", "1,10,2,6"], "is not 'BT,N,H,D'"),
        (["--reps", "-1"], "--reps must be >= 1"),
    ],
)
def test_benchmark_rejects_bad_options(option, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--device", "cpu", *option])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
