"""Evaluate a POST3R run or checkpoint on a validation set.

Run from the repository root: `uv run apps/evaluate --help`.
"""

from post3r_train.evaluate import main

# Guarded: worker processes (spawn, DDP) import this file without running the command again.
if __name__ == "__main__":
    raise SystemExit(main())
