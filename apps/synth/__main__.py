"""Generate synthetic 3D video shards (objects, camera motion, masks, geometry).

Run from the repository root: `uv run apps/synth --help`.
"""

from post3r_data.synth_cli import main

# Guarded so that worker processes started with 'spawn' do not run the CLI again.
if __name__ == "__main__":
    raise SystemExit(main())
