"""Run the frozen TTT3R teacher once over every whole video into sidecar shards.

Run from the repository root: `uv run apps/cache-teacher --help`.
"""

from post3r_train.teacher_cache import main

# Guarded: worker processes (spawn, DDP) import this file without running the command again.
if __name__ == "__main__":
    raise SystemExit(main())
