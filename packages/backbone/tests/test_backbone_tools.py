"""The README example runs, and the benchmark prints its table (tiny sizes only)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from post3r_backbone.benchmark import main as benchmark_main

README = Path(__file__).parents[1] / "README.md"


def test_readme_example_runs(capsys):
    example = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    exec(compile(example, str(README), "exec"), {})
    assert "torch.Size([2, 5, 48, 64, 3])" in capsys.readouterr().out


def test_benchmark_prints_a_table(capsys):
    assert benchmark_main(["--device", "cpu", "--lengths", "2", "3", "--warmup", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.startswith(("ttt3r", "cut3r"))]
    assert [(r[0], r[1]) for r in rows] == [
        ("ttt3r", "2"),
        ("ttt3r", "3"),
        ("cut3r", "2"),
        ("cut3r", "3"),
    ]
    assert all(float(r[2]) > 0 for r in rows)  # frames/s
    assert rows[2][-1] == "1.00"  # cut3r against itself


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--size", "384"], "'384' is not HxW"),
        (["--lengths", "0"], "--lengths: must be a positive integer, got 0"),
        (["--batch", "0"], "--batch: must be a positive integer, got 0"),
        (["--set", "enc_dept=2"], "--set: unknown TTT3R config key 'enc_dept'"),
        (["--set", "enc_depth"], "'enc_depth' is not KEY=VALUE"),
        (["--repeats", "0"], "--repeats: must be a positive integer, got 0"),
        (["--size", "50x64", "--lengths", "2"], "frame size (50, 64) (H, W) must be a multiple"),
    ],
)
def test_benchmark_rejects_bad_options(option, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark_main(["--device", "cpu", *option])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_benchmark_compares_the_heads_layouts(capsys):
    argv = ["--device", "cpu", "--lengths", "2", "--warmup", "0", "--compare-layout"]
    assert benchmark_main([*argv, "--repeats", "2", "--set", "dec_depth=2"]) == 0
    out = capsys.readouterr().out
    assert "tiny dec_depth=2 on CPU" in out
    rows = {
        line.split()[0]: line.split() for line in out.splitlines() if line[:4] in ("new ", "old ")
    }
    assert set(rows) == {"new", "old"}
    assert rows["new"][2] == rows["old"][2] == "2"  # runs per layout
    assert rows["old"][-3:] == ["1.00", "1.00", "1.00"]  # old against itself: fps, cpu, memory
    assert float(rows["new"][-3]) > 0


def test_benchmark_compares_the_dpt_arithmetic(capsys, monkeypatch):
    from post3r_backbone import benchmark

    policies: list[str] = []
    for name in benchmark.CPU_MEMORY:
        monkeypatch.setitem(benchmark.CPU_MEMORY, name, lambda name=name: policies.append(name))
    ropes: list[str | None] = []
    stream = benchmark.stream

    def recorded_stream(*args, **kwargs):
        ropes.append(os.environ.get("POST3R_ROPE2D_IMPL"))
        return stream(*args, **kwargs)

    monkeypatch.setattr(benchmark, "stream", recorded_stream)
    monkeypatch.delenv("POST3R_ROPE2D_IMPL", raising=False)
    argv = ["--device", "cpu", "--lengths", "2", "--warmup", "0", "--compare-heads"]
    assert benchmark_main([*argv, "--set", "dec_depth=2"]) == 0
    # The process keeps freed memory; the code before issue 18 ran with glibc's default and
    # the reference RoPE2D, restored afterwards.
    assert policies == ["keep", "keep", "keep", "unmap"]
    assert ropes == [None, None, "torch"]
    assert "POST3R_ROPE2D_IMPL" not in os.environ
    out = capsys.readouterr().out
    assert "DPT arithmetic, ttt3r rule" in out
    assert "cpu/old" in out
    lines = [line.split() for line in out.splitlines()]
    rows = {words[0]: words for words in lines if words and words[0] in ("new", "plain", "old")}
    assert set(rows) == {"new", "plain", "old"}
    assert rows["old"][-3:] == ["1.00", "1.00", "1.00"]  # the heads before, against themselves
    assert float(rows["new"][-2]) > 0  # cpu seconds ratio


def test_benchmark_compares_one_thing_at_a_time(capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark_main(["--device", "cpu", "--compare-layout", "--compare-heads"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_previous_rope_is_what_auto_picked_before_the_eager_implementation(monkeypatch):
    import torch

    from post3r_backbone import TTT3RConfig, benchmark

    model = benchmark.random_model(TTT3RConfig.preset("tiny"), torch.device("cpu"))
    monkeypatch.delenv("POST3R_ROPE2D_IMPL", raising=False)
    with benchmark.previous_rope(model):  # CPU: auto picks eager now, the reference before
        assert os.environ["POST3R_ROPE2D_IMPL"] == "torch"
    assert "POST3R_ROPE2D_IMPL" not in os.environ
    monkeypatch.setattr(benchmark, "auto_impl", lambda x: "triton")  # a GPU: unchanged
    with benchmark.previous_rope(model):
        assert "POST3R_ROPE2D_IMPL" not in os.environ
    monkeypatch.setenv("POST3R_ROPE2D_IMPL", "eager")  # the user's choice stays
    with benchmark.previous_rope(model):
        assert os.environ["POST3R_ROPE2D_IMPL"] == "eager"
