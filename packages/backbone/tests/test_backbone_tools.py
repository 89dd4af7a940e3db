"""The README example runs, and the benchmark prints its table (tiny sizes only)."""

from __future__ import annotations

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
    ],
)
def test_benchmark_rejects_bad_options(option, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark_main(["--device", "cpu", *option])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
