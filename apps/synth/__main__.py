"""Generate synthetic 3D video shards (objects, camera motion, masks, geometry).

Run from the repository root: `uv run apps/synth --help`.
"""

from post3r_data.synth_cli import main

# Guarded: worker processes (spawn, DDP) import this file without running the command again.
if __name__ == "__main__":
    raise SystemExit(main())
