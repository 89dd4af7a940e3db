"""Benchmark the slot pipeline (slot attention, predictor, decoders) forward+backward.

Run from the repository root: `uv run apps/bench-slots --help`.
"""

from post3r_slots.benchmark import main

# Guarded: worker processes (spawn, DDP) import this file without running the command again.
if __name__ == "__main__":
    raise SystemExit(main())
