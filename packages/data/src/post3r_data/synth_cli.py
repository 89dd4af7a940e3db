"""`uv run apps/synth`: the command line of the synthetic generator (`post3r_data.synth`)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from post3r_data.shards import interrupted_write_message
from post3r_data.synth import SHAPE_NAMES, SynthConfig, generate_synthetic_dataset


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="apps/synth",
        description="Render synthetic 3D videos (objects, camera motion, masks, depth, "
        "pointmaps, poses, intrinsics) into synthetic-{train,validation}-NNNNNN.tar shards.",
    )
    parser.add_argument("--output", required=True, type=Path, help="directory for the shards")
    parser.add_argument("--videos", required=True, type=int, help="number of training videos")
    parser.add_argument("--val-videos", type=int, default=None, help="default: videos // 8")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--frames", type=int, default=8, help="frames per video")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--videos-per-shard", type=int, default=32)
    parser.add_argument("--min-objects", type=int, default=SynthConfig.min_objects)
    parser.add_argument("--max-objects", type=int, default=SynthConfig.max_objects)
    parser.add_argument(
        "--shapes", default=",".join(SHAPE_NAMES), help="comma list of sphere,box,cylinder"
    )
    parser.add_argument("--no-textures", action="store_true", help="plain-coloured objects")
    parser.add_argument("--object-motion", type=float, default=1.0, help="0 = static objects")
    parser.add_argument("--camera-motion", type=float, default=1.0, help="0 = static camera")
    parser.add_argument("--no-shadows", action="store_true")
    parser.add_argument("--fixed-lighting", action="store_true", help="same light in every video")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace existing synthetic shards"
    )
    parser.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="rendering processes"
    )
    args = parser.parse_args(argv)
    try:
        config = SynthConfig(
            min_objects=args.min_objects,
            max_objects=args.max_objects,
            shapes=tuple(s.strip() for s in args.shapes.split(",") if s.strip()),
            textures=not args.no_textures,
            object_motion=args.object_motion,
            camera_motion=args.camera_motion,
            shadows=not args.no_shadows,
            random_lighting=not args.fixed_lighting,
        )
        result = generate_synthetic_dataset(
            args.output,
            args.videos,
            size=args.size,
            frames=args.frames,
            seed=args.seed,
            num_val_videos=args.val_videos,
            videos_per_shard=args.videos_per_shard,
            config=config,
            overwrite=args.overwrite,
            workers=args.workers,
        )
    except ValueError as error:
        parser.error(str(error))
    except OSError as error:  # a read-only or full output directory: the finished shards stay
        print(f"error: {interrupted_write_message(error)}", file=sys.stderr)
        return 1
    for split, summary in result.splits.items():
        print(f"{split:>10}: {summary.describe()}")
    print(
        f"rendered {result.rendered_videos} videos in {result.seconds:.1f} s "
        f"({result.videos_per_second:.1f} videos/s) into {result.out_dir}"
    )
    return 0
