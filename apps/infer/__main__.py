"""Run a trained POST3R model on a folder of frames or a video file.

Run from the repository root: `uv run apps/infer --help`.
"""

from post3r_train.infer import main

# Guarded: worker processes (spawn, DDP) import this file without running the command again.
if __name__ == "__main__":
    raise SystemExit(main())
