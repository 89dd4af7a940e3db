"""atomic_write: whole files or none, the mode a plain open gives, nothing left on failure."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from post3r_io import atomic_path, atomic_write, atomic_write_text


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_get_the_mode_a_plain_open_gives(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    atomic_write_text(tmp_path / "atomic", "x")
    assert mode(tmp_path / "atomic") == mode(plain)
    assert mode(plain) & 0o044 == 0o044 & ~_umask()  # group/others read unless the umask says no


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "result.bin"
    atomic_write(target, lambda file: file.write(b"old"))

    def disk_full(file) -> None:
        file.write(b"half of the new")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, disk_full)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.bin"]


def test_a_write_replaces_the_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "text.txt"
    atomic_write_text(target, "a long first version\n" * 100)
    atomic_write_text(target, "short")
    assert target.read_text() == "short"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_a_writer_that_sets_its_own_mode_still_gets_the_rule(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    with atomic_path(tmp_path / "weights.bin") as tmp:
        tmp.write_bytes(b"weights")
        tmp.chmod(0o600)  # what safetensors' save_file does
    assert mode(tmp_path / "weights.bin") == mode(plain)
    assert (tmp_path / "weights.bin").read_bytes() == b"weights"
