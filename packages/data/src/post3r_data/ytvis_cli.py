"""`uv run apps/prepare-ytvis`: the command line of the YT-VIS converter (`post3r_data.ytvis`)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from post3r_data.shards import interrupted_write_message
from post3r_data.ytvis import RESAMPLING_FILTERS, convert_ytvis


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="apps/prepare-ytvis",
        description="Convert YouTube-VIS 2021 into ytvis-{train,validation}-NNNNNN.tar shards "
        "(SlotContrast's format). Validation = the last --val-videos training videos.",
    )
    parser.add_argument("--input", required=True, type=Path, help="unpacked YouTube-VIS 2021 root")
    parser.add_argument("--output", required=True, type=Path, help="directory for the shards")
    parser.add_argument("--size", type=int, default=518, help="short side in pixels (default 518)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--videos-per-shard", type=int, default=10)
    parser.add_argument("--val-videos", type=int, default=300)
    parser.add_argument("--split", choices=["train", "validation", "all"], default="all")
    parser.add_argument(
        "--filter", choices=sorted(RESAMPLING_FILTERS), default="bilinear", help="frame resampling"
    )
    parser.add_argument(
        "--skip-bad", action="store_true", help="leave out broken videos, list them"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="delete existing ytvis shards first"
    )
    args = parser.parse_args(argv)
    splits = ["train", "validation"] if args.split == "all" else [args.split]
    try:
        result = convert_ytvis(
            args.input,
            args.output,
            size=args.size,
            workers=args.workers,
            videos_per_shard=args.videos_per_shard,
            val_videos=args.val_videos,
            splits=splits,
            resample=args.filter,
            skip_bad=args.skip_bad,
            overwrite=args.overwrite,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # missing input, read-only or full output: finished shards stay
        missing_input = isinstance(error, FileNotFoundError)
        message = str(error) if missing_input else interrupted_write_message(error)
        print(f"error: {message}", file=sys.stderr)
        return 1
    if result.kept_shards:
        print(f"kept {result.kept_shards} finished shards from an earlier run")
    for split, summary in result.splits.items():
        print(f"{split:>10}: {summary.describe()}")
    if result.skipped:
        print(f"skipped {len(result.skipped)} bad videos:")
        for entry in result.skipped:
            print(
                f"  {entry['split']} video {entry['video_id']} ({entry['name']}): {entry['reason']}"
            )
    print(f"shards in {args.output}")
    return 0
