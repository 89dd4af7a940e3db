"""Benchmark POST3R training steps per second and peak memory.

Run from the repository root: `uv run apps/bench-train --help`.
"""

from post3r_train.bench_train import main

# Guarded: worker processes (spawn, DDP) import this file without running the command again.
if __name__ == "__main__":
    raise SystemExit(main())
