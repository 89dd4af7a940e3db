"""A smoke training run (configs/smoke.yaml), made once per test process and shared by the CLI
and apps tests."""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from post3r_train.cli import main

# A random-weight DINOv2 ViT and TTT3R backbone small enough for CPU tests.
TINY_VIT = [
    "model.encoder.name=dinov2",
    "model.encoder.pretrained=false",
    "model.encoder.image_size=28",
    "model.encoder.block=2",
    "model.encoder.timm_kwargs={embed_dim: 24, depth: 2, num_heads: 2}",
    "model.feature_decoder.target=encoder",
]
TINY_TTT3R = [
    "model.teacher.name=ttt3r",
    "model.teacher.preset=tiny",
    "model.teacher.random_weights=true",
    "model.teacher.image_size=32",
]


@dataclass(frozen=True)
class SmokeRun:
    code: int
    stdout: str
    data: Path
    logs: Path
    run_dir: Path


def call(entry: Callable[[list[str]], int], argv: list[str]) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of an app's `main(argv)` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = entry(argv)
        except SystemExit as exit_:
            code = int(exit_.code or 0)
    return code, out.getvalue(), err.getvalue()


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `apps/train argv` run in this process."""
    return call(main, argv)


@functools.cache
def smoke_run() -> SmokeRun:
    root = Path(tempfile.mkdtemp(prefix="post3r-smoke-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    data, logs = root / "data", root / "logs"
    code, stdout, stderr = run_cli(["smoke", "--data-dir", str(data), "--log-dir", str(logs), "-q"])
    assert code == 0, stderr
    (run_dir,) = (logs / "smoke").iterdir()
    return SmokeRun(code, stdout, data, logs, run_dir)
