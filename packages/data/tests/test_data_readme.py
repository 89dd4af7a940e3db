"""The README's example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys):
    example = re.search(r"## Example\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    exec(compile(example, str(README), "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 + 2  # three training batches, two validation videos
    assert "(4, 2, 3, 32, 32) (4, 2, 32, 32, 3)" in lines[0]
    assert "['synthetic_validation_000000'] (1, 4, 32, 32)" in lines[3]
