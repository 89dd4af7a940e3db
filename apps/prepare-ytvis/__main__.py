"""Convert YouTube-VIS 2021 to WebDataset shards.

Run from the repository root: `uv run apps/prepare-ytvis --help`.
"""

from post3r_data.ytvis_cli import main

# Guarded: worker processes (spawn, DDP) import this file without running the command again.
if __name__ == "__main__":
    raise SystemExit(main())
