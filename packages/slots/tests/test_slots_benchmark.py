"""The benchmark script runs every component and prints its table (no timing is asserted)."""

import pytest
import torch

from post3r_slots import benchmark

TINY = [
    "--device", "cpu", "--batch-size", "1", "--frames", "2", "--patches", "16",
    "--feature-dim", "16", "--slots", "2", "--slot-dim", "64", "--decoder-hidden", "16",
    "--resolution", "16", "16", "--target-resolution", "20", "20", "--warmup", "0",
    "--repeats", "1",
]  # fmt: skip


def test_defaults_are_ytvis_scale():
    args = benchmark.parse_args([])
    assert (args.batch_size, args.frames, args.patches, args.feature_dim) == (8, 4, 1369, 768)
    assert (args.slots, args.slot_dim, args.compare) == (7, 128, "bf16")


def test_main_prints_the_table(capsys, monkeypatch):
    # Measure in this process (the isolated path is tested below, once).
    monkeypatch.setattr(benchmark, "measure_isolated", benchmark.measure)
    assert benchmark.main(TINY) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "speed-up" in lines[2]
    rows = [line for line in lines if line.startswith(tuple(benchmark.COMPONENTS))]
    assert len(rows) == len(benchmark.COMPONENTS)
    for row in rows:  # both variants of every row were measured: four numbers
        assert all(float(cell) >= 0 for cell in row[36:].split()[:4]), row
    assert any(line.startswith("pipeline") for line in lines)


def test_cpu_measurement_runs_in_a_child_process():
    sizes = benchmark.Sizes(1, 2, 16, 16, 2, 64, (16,), (16, 16), (20, 20))
    component = "MLP feature decoder"
    result = benchmark.measure_isolated(component, sizes, torch.device("cpu"), "fp32", 0, 1)
    assert isinstance(result, benchmark.Measurement), result
    assert result.milliseconds > 0 and result.peak_mib >= 0


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--repeats", "0", "must be an integer >= 1, got 0"),  # was a table of n/a, exit 0
        ("--warmup", "-1", "must be an integer >= 0, got -1"),
        ("--frames", "1", "must be an integer >= 2, got 1"),
        ("--patches", "x", "invalid int value: 'x'"),
    ],
)
def test_bad_sizes_are_parser_errors(option, value, message, capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args([option, value])
    assert message in capsys.readouterr().err
