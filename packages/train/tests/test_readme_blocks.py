"""Every code block of every README (and docs/*.md) runs as written, unless marked.

Python blocks run in this process (in a fresh namespace, from an empty working directory);
shell blocks run with bash from the repository root (with UV_NO_SYNC=1, so `uv run` uses this
environment). A block that needs a GPU, downloaded files, a cluster or minutes of training is
marked on the line before its fence with the reason, which the skip reports:

    <!-- readme-test: skip (needs the 3.2 GB CUT3R checkpoint) -->
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
DOCUMENTS = [
    ROOT / "README.md",
    *sorted(ROOT.glob("packages/*/README.md")),
    *sorted(ROOT.glob("docs/*.md")),
]
FENCE = re.compile(r"^```(python|bash|sh|shell)\n(.*?)^```", re.S | re.M)
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((.+?)\)\s*-->")


def blocks() -> list:
    found = []
    for document in DOCUMENTS:
        text = document.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            before = text[: match.start()].rstrip().splitlines()
            skip = SKIP.fullmatch(before[-1].strip()) if before else None
            name = f"{document.relative_to(ROOT)}:{line}"
            marks = [pytest.mark.skip(reason=skip.group(1))] if skip else []
            found.append(pytest.param(match.group(1), match.group(2), id=name, marks=marks))
    return found


@pytest.mark.parametrize(("language", "code"), blocks())
def test_block_runs_as_written(language: str, code: str, tmp_path, monkeypatch, capsys) -> None:
    if language == "python":
        monkeypatch.chdir(tmp_path)
        exec(compile(code, "<readme block>", "exec"), {"__name__": "__readme__"})
        return
    env = {**os.environ, "UV_NO_SYNC": "1"}
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (
        f"{code}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )


def test_skip_markers_give_a_reason() -> None:
    for document in DOCUMENTS:
        for line in document.read_text().splitlines():
            if "readme-test" in line:
                assert SKIP.fullmatch(line.strip()), f"{document}: malformed marker {line!r}"
