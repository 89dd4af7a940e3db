"""`apps/bench-train --seeds`: seed lists, the train command's final line parsed, the table's
rows (every seed, mean, worst, failures), and a real two-seed run on tiny settings."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_model_runs import call

from post3r_train.bench_train import main as bench_main
from post3r_train.errors import ConfigError
from post3r_train.seed_table import SeedResult, format_table, parse_seeds, parse_validation


def test_seed_lists_and_ranges():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("1,3,7") == [1, 3, 7]
    assert parse_seeds("0-2, 5") == [0, 1, 2, 5]
    assert parse_seeds("3") == [3]
    for bad, message in (("4-0", "is empty"), ("a", "expected seeds"), ("0-2,1", "twice")):
        with pytest.raises(ConfigError, match=message):
            parse_seeds(bad)


def test_the_last_validation_line_is_parsed():
    stdout = (
        "validation: ari 0.100, mbo 0.200\n"
        "finished at step 10000 (max_steps) in 9.1 min\n"
        "validation: ari 0.912, mbo 0.487, image_ari 0.930, pointmap_ari -0.050\n"
        "run directory: outputs/x\n"
    )
    assert parse_validation(stdout) == {
        "ari": 0.912,
        "mbo": 0.487,
        "image_ari": 0.930,
        "pointmap_ari": -0.050,
    }
    assert parse_validation("finished at step 3\n") is None


def test_table_has_every_seed_then_mean_and_worst_of_the_finished_ones():
    results = [
        SeedResult(0, {"ari": 0.9, "mbo": 0.5, "pointmap_ari": 0.8}, 600.0),
        SeedResult(1, {"ari": 0.7, "mbo": 0.3, "pointmap_ari": 0.6}, 720.0),
        SeedResult(2, None, 5.0, "exit code 1"),
    ]
    lines = format_table(results).splitlines()
    assert lines[0] == "| seed | video FG-ARI | video mBO | pointmap video ARI | wall time |"
    assert lines[2] == "| 0 | 0.900 | 0.500 | 0.800 | 10.0 min |"
    assert lines[4].startswith("| 2 | failed: exit code 1 |")
    assert lines[5] == "| **mean** | 0.800 | 0.400 | 0.700 | 11.0 min |"
    assert lines[6] == "| **worst** | 0.700 | 0.300 | 0.600 | 12.0 min |"


def test_two_seeds_end_to_end_on_tiny_settings(tmp_path):
    tiny = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.progress_bar=false"]
    argv = ["--seeds", "0-1", "--config", "smoke", "--keep", str(tmp_path), *tiny]
    code, stdout, stderr = call(bench_main, argv)
    assert code == 0, stderr
    assert "machine: " in stdout and "cores available" in stdout
    rows = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[2:]] == ["| 0", "| 1", "| **mean**", "| **worst**"]
    for row in rows[2:4]:
        ari, mbo, pointmap_ari = (float(cell) for cell in row.split(" | ")[1:4])
        assert -1 <= ari <= 1 and 0 <= mbo <= 1 and -1 <= pointmap_ari <= 1
    # each seed had its own fresh data (generated in its wall time) and its own run
    for seed in (0, 1):
        assert any((tmp_path / f"seed-{seed}" / "data").glob("*-train-*.tar"))
        (run,) = (tmp_path / f"seed-{seed}" / "logs" / "smoke").iterdir()
        assert f"seed: {seed}" in (run / "config.yaml").read_text()


def test_bad_seed_override_or_config_fails_before_any_run(tmp_path):
    for argv, message in (
        (["--seeds", "0-1", "seed=3"], "--seeds sets seed=N itself"),
        (["--seeds", "0-1", "model.slots.grouper=gru"], "is not one of slot_attention"),
        (["--seeds", "x"], "expected seeds like 0-4"),
    ):
        code, stdout, stderr = call(bench_main, [*argv, "--keep", str(tmp_path)])
        assert code == 2 and message in stderr and "Traceback" not in stderr
        assert stdout == "" and not any(tmp_path.iterdir())
