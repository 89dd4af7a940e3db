"""Benchmark the RoPE2D implementations (torch, torch.compile, Triton) against copy bandwidth.

Run from the repository root: `uv run apps/bench-rope2d --help`.
"""

from post3r_kernels.benchmark import main

# Guarded: worker processes (spawn, DDP) import this file without running the command again.
if __name__ == "__main__":
    raise SystemExit(main())
