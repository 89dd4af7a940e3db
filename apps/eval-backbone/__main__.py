"""Video depth and camera metrics of the TTT3R backbone alone, both update rules.

Run from the repository root: `uv run apps/eval-backbone --help`.
"""

from post3r_train.eval_backbone import main

# Guarded: worker processes (spawn, DDP) import this file without running the command again.
if __name__ == "__main__":
    raise SystemExit(main())
