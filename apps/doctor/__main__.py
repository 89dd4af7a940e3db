"""Check a machine (and, given a config, its files and data) before a long job.

Run from the repository root: `uv run apps/doctor [CONFIG] [--data-dir D] [key=value ...]`.
"""

from post3r_train.doctor import main

# Guarded: worker processes (spawn, DDP) import this file without running the command again.
if __name__ == "__main__":
    raise SystemExit(main())
