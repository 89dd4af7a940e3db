"""Benchmark shard decoding, augmentation and synthetic rendering throughput.

Run from the repository root: `uv run apps/bench-data --help`.
"""

from post3r_data.benchmark import main

# Guarded so that worker processes started with 'spawn' do not run the CLI again.
if __name__ == "__main__":
    raise SystemExit(main())
