"""Bad arguments to post3r_data's entry points: a message naming the argument, no traceback."""

from __future__ import annotations

import pytest

from post3r_data import make_train_loader, make_val_loader
from post3r_data.benchmark import main as bench_main


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--batch-size", "0"], "--batch-size: must be a whole number >= 1, got 0"),
        (["--videos", "-2"], "--videos: must be a whole number >= 1, got -2"),
        (["--workers", "-1"], "--workers: must be a whole number >= 0, got -1"),
    ],
)
def test_bench_data_rejects_bad_options(option, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_main(option)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_data_on_a_missing_directory_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["--data-dir", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert "nowhere does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"batch_size": "2"}, "batch_size must be a whole number >= 1, got '2'"),
        ({"batch_size": 0}, "batch_size must be a whole number >= 1, got 0"),
        ({"chunk_size": 2.5}, "chunk_size must be a whole number >= 1, got 2.5"),
    ],
)
def test_loader_counts_must_be_whole_numbers(tmp_path, arguments, message):
    shard = str(tmp_path / "toy-train-000000.tar")
    settings = {"batch_size": 2, "chunk_size": 2, "resolution": 8} | arguments
    with pytest.raises(ValueError, match=message):
        make_train_loader([shard], **settings)
    with pytest.raises(ValueError, match=message):
        make_val_loader([shard], **settings)
