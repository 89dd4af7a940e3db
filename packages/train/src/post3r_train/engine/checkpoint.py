"""Training checkpoints: atomic saving, strict and readable loading, finding and pruning.

A checkpoint is a dict written by `torch.save` and read with `weights_only=True` (no code runs
on load). Writes go to a temporary file in the same directory, are fsync'ed and then renamed
over the target, so a crash, SIGKILL or full disk leaves the previous file intact.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import IO, Any

import torch

from post3r_train.atomic import atomic_write, fsync_directory
from post3r_train.errors import CheckpointError

FORMAT = "post3r-train-checkpoint"
VERSION = 1
LAST = "last.ckpt"
_STEP_NAME = re.compile(r"step=(\d+)\.ckpt")
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")  # in torch's weights_only refusal


def step_checkpoint_name(step: int) -> str:
    return f"step={step:06d}.ckpt"


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Atomically write `payload` (tagged with our format and version) to `path`."""
    tagged = {"format": FORMAT, "version": VERSION, **payload}
    atomic_write(path, lambda file: torch.save(tagged, file))


def publish_as(source: Path, target: Path) -> None:
    """Make `target` (e.g. last.ckpt) atomically hold the same bytes as `source`.

    A hard link costs no space or time; file systems without hard links get a copy.
    """
    tmp = target.with_name(f".{target.name}.link.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        os.link(source, tmp)
        os.replace(tmp, target)
        fsync_directory(target.parent)
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        atomic_write(target, lambda file: _copy_into(source, file))


def _copy_into(source: Path, file: IO[bytes]) -> None:
    with open(source, "rb") as src:
        shutil.copyfileobj(src, file, length=16 << 20)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Read one of our checkpoints, with an error naming the file when it is not usable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _unreadable(path, exc) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a post3r training checkpoint (no '{FORMAT}' tag); "
            "--continue takes a run directory or a .ckpt written by this trainer"
        )
    if payload.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {payload['version']}, newer than this code "
            f"understands ({VERSION}); update post3r-train"
        )
    return payload


def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    """Why torch.load refused `path`: empty, holding code, or truncated/corrupt."""
    if "Weights only load failed" in str(exc):  # a pickled class or function (nothing ran)
        refused = _REFUSED_GLOBAL.search(str(exc))
        what = refused.group(1) if refused else "code, not only tensors"
        return CheckpointError(
            f"{path} holds objects a training checkpoint must not hold ({what}); "
            "it was refused without running them. Checkpoints written by this trainer hold "
            f"only tensors and plain values: use one of those; {_alternatives(path)}"
        )
    if path.stat().st_size == 0:
        return CheckpointError(
            f"{path} is empty (0 bytes): a copy or write that never finished; {_alternatives(path)}"
        )
    lines = str(exc).strip().splitlines() or ["no details"]
    return CheckpointError(
        f"{path} cannot be read ({type(exc).__name__}: {lines[0]}). "
        f"The file is truncated or corrupt; {_alternatives(path)}"
    )


def _alternatives(path: Path) -> str:
    others = [p.name for p in sorted(path.parent.glob("*.ckpt")) if p.name != path.name]
    if others:
        return f"resume from another checkpoint in {path.parent}: {', '.join(others)}"
    return "no other checkpoint is in that directory"


def step_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """`step=NNNNNN.ckpt` files in `directory`, oldest first."""
    found = []
    for path in Path(directory).glob("step=*.ckpt"):
        match = _STEP_NAME.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Delete all but the newest `keep` (>= 1) step checkpoints; -1 keeps them all."""
    if keep < 0:
        return
    for _, path in step_checkpoints(directory)[:-keep]:
        path.unlink(missing_ok=True)


def find_checkpoint(run_or_file: Path) -> Path:
    """The checkpoint a path names (`--continue`, evaluation): the file itself, or a run
    directory's `last.ckpt`, else its newest `step=*.ckpt`."""
    path = Path(run_or_file)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such run directory or checkpoint file")
    directory = path / "results" / "checkpoints" if (path / "results").is_dir() else path
    if (directory / LAST).is_file():
        return directory / LAST
    steps = step_checkpoints(directory)
    if not steps:
        raise CheckpointError(
            f"{path}: no checkpoint in {directory} (expected {LAST} or step=*.ckpt); the run "
            "stopped before its first checkpoint, so there is nothing to resume or evaluate"
        )
    return steps[-1][1]
