"""Benchmark the slot pipeline (slot attention, predictor, decoders) forward+backward.

Run from the repository root: `uv run apps/bench-slots --help`.
"""

from post3r_slots.benchmark import main

if __name__ == "__main__":  # the benchmark's worker processes import this file too
    raise SystemExit(main())
