"""Benchmark TTT3R frames per second and peak memory against sequence length.

Run from the repository root: `uv run apps/bench-backbone --help`.
"""

from post3r_backbone.benchmark import main

# Guarded: worker processes (spawn, DDP) import this file without running the command again.
if __name__ == "__main__":
    raise SystemExit(main())
