"""Generate synthetic 3D video shards (objects, camera motion, masks, geometry).

Run from the repository root: `uv run apps/synth --help`.
"""

from post3r_data.synth import main

raise SystemExit(main())
