"""Convert an original TTT3R/CUT3R .pth checkpoint to safetensors.

Run from the repository root: `uv run apps/convert-checkpoint --help`.
"""

from post3r_backbone.convert import main

# Guarded: worker processes (spawn, DDP) import this file without running the command again.
if __name__ == "__main__":
    raise SystemExit(main())
