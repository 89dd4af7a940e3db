"""Train POST3R (the embedded synthetic default when run without arguments).

Run from the repository root: `uv run apps/train --help`.
"""

from post3r_train.cli import main

# Guarded: worker processes (spawn, DDP) import this file without running the command again.
if __name__ == "__main__":
    raise SystemExit(main())
