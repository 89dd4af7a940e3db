"""Convert YouTube-VIS 2021 to WebDataset shards.

Run from the repository root: `uv run apps/prepare-ytvis --help`.
"""

from post3r_data.ytvis import main

raise SystemExit(main())
