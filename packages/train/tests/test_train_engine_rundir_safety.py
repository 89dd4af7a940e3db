"""A run directory is never damaged: failed resumes leave it as it was, one job holds it at a
time (the lock dies with its holder), and failed starts leave nothing behind."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from post3r_train.engine import StateDictMismatchError, fit, seed_everything
from post3r_train.engine.runlock import LOCK_NAME, RunLock, lock_holder
from post3r_train.errors import RunDirLockedError

sys.path.insert(0, str(Path(__file__).parent))
import train_engine_toy as toy


def run(log_dir, make=toy.ToyModule, train=None, resume=None, **settings):
    seed_everything(0)
    return fit(
        make(),
        train or toy.train_stream(0, 1, 4),
        None,
        trainer=toy.small_trainer(**settings),
        optim=toy.small_optim(),
        log_dir=log_dir,
        experiment="toy",
        config={"note": "safety test"},
        resume=resume,
    )


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (and every folder) with a digest of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "/"
        for p in sorted(root.rglob("*"))
    }


def test_a_failed_continue_leaves_the_run_directory_byte_for_byte(tmp_path: Path) -> None:
    result = run(tmp_path, max_steps=2)
    before = snapshot(result.run_dir)
    with pytest.raises(StateDictMismatchError):  # a model that does not fit the checkpoint
        run(None, make=lambda: toy.ToyModule(hidden=8), resume=result.run_dir, max_steps=4)
    assert snapshot(result.run_dir) == before


def test_a_second_job_on_a_held_run_directory_is_refused_naming_the_holder(tmp_path) -> None:
    result = run(tmp_path, max_steps=2)
    before = snapshot(result.run_dir)
    with RunLock.acquire(result.run_dir):
        assert f"pid {os.getpid()}" in lock_holder(result.run_dir)
        with pytest.raises(RunDirLockedError, match=rf"in use by another job \(pid {os.getpid()}"):
            run(None, resume=result.run_dir, max_steps=4)
    assert snapshot(result.run_dir) == before  # released: the lock file is gone again
    assert lock_holder(result.run_dir) is None
    assert run(None, resume=result.run_dir, max_steps=4).step == 4


def test_the_lock_dies_with_a_killed_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import time
                from post3r_train.engine.runlock import RunLock
                RunLock.acquire({str(tmp_path)!r})
                print("held", flush=True)
                time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert f"pid {holder.pid}" in lock_holder(tmp_path)
        with pytest.raises(RunDirLockedError, match=f"pid {holder.pid}"):
            RunLock.acquire(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / LOCK_NAME).exists()  # SIGKILL left the file, but not the lock
    deadline = time.monotonic() + 10
    while lock_holder(tmp_path) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    with RunLock.acquire(tmp_path) as lock:
        assert f"pid {os.getpid()}" in lock.path.read_text()
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_lock_is_held_while_training(tmp_path: Path) -> None:
    seen = []

    class Probe(toy.ToyModule):
        def training_step(self, batch):
            seen.extend(p.parent for p in tmp_path.glob(f"toy/*/{LOCK_NAME}"))
            return super().training_step(batch)

    result = run(tmp_path, make=Probe, max_steps=2)
    assert seen and seen[0] == result.run_dir
    assert not (result.run_dir / LOCK_NAME).exists()


def test_a_run_that_fails_before_its_first_step_leaves_no_directory(tmp_path: Path) -> None:
    def broken_stream(rank: int):
        raise FileNotFoundError("no shards in data/ (a loader failing at start)")

    for _ in range(3):
        with pytest.raises(FileNotFoundError):
            run(tmp_path, train=broken_stream, max_steps=2)
    assert list((tmp_path / "toy").iterdir()) == []


@pytest.mark.slow  # spawns processes that import torch
def test_under_ddp_every_rank_stops_with_the_holder_named(tmp_path: Path, capfd) -> None:
    from post3r_train.engine import launch_local

    result = run(tmp_path, max_steps=2)
    before = snapshot(result.run_dir)
    argv = ["--log-dir", str(tmp_path), "--continue", str(result.run_dir), "--max-steps", "4"]
    with RunLock.acquire(result.run_dir):
        assert launch_local(2, argv, script=toy.__file__) == 1  # both ranks end, none hangs
    output = capfd.readouterr()
    assert f"in use by another job (pid {os.getpid()}" in output.out + output.err
    assert snapshot(result.run_dir) == before
