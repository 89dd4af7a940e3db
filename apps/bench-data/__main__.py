"""Benchmark shard decoding, augmentation and synthetic rendering throughput.

Run from the repository root: `uv run apps/bench-data --help`.
"""

from post3r_data.benchmark import main

raise SystemExit(main())
