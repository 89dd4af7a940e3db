"""A video (MP4, GIF) of the slots' 3D point clouds from an orbit or the pulled-back trajectory.

Run from the repository root: `uv run apps/render --help`.
"""

from post3r_train.render_cli import main

# Guarded: worker processes (spawn, DDP) import this file without running the command again.
if __name__ == "__main__":
    raise SystemExit(main())
