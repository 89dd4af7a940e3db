"""Interactive 3D viewer (viser) of an infer output or a run's latest validation video.

Run from the repository root: `uv run apps/view --help`.
"""

from post3r_train.viewer import main

# Guarded: worker processes (spawn, DDP) import this file without running the command again.
if __name__ == "__main__":
    raise SystemExit(main())
