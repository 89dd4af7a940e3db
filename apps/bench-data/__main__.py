"""Benchmark shard decoding, augmentation and synthetic rendering throughput.

Run from the repository root: `uv run apps/bench-data --help`.
"""

from post3r_data.benchmark import main

# Guarded: worker processes (spawn, DDP) import this file without running the command again.
if __name__ == "__main__":
    raise SystemExit(main())
