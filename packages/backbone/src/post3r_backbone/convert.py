"""Convert an original CUT3R/TTT3R `.pth` checkpoint to safetensors.

    uv run apps/convert-checkpoint checkpoints/cut3r_512_dpt_4_64.pth \\
        checkpoints/cut3r_512_dpt_4_64.safetensors

The input is read with a restricted unpickler (nothing in it is executed), checked strictly
against the architecture its own `args.model` string describes, scanned for non-finite values,
and written atomically with the config stored as safetensors metadata.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from post3r_backbone.checkpoint import (
    TTT3RCheckpointError,
    alias_keys,
    match_state_dict,
    read_original_checkpoint,
    save_safetensors,
)
from post3r_backbone.config import TTT3RConfigError, matching_preset
from post3r_backbone.model import TTT3R


def convert(source: Path, target: Path, progress: bool = True) -> dict[str, Any]:
    """Convert `source` (.pth) to `target` (.safetensors); returns a summary."""
    start = time.perf_counter()
    config, state_dict, ignored = read_original_checkpoint(source)
    with torch.device("meta"):
        model = TTT3R(config)
    full = match_state_dict(model, state_dict)
    aliases = alias_keys(model)
    tensors = {}
    for key in tqdm(
        [k for k in full if k not in aliases], desc="checking", unit="tensor", disable=not progress
    ):
        value = full[key].to(torch.float32).contiguous()
        if not torch.isfinite(value).all():
            raise TTT3RCheckpointError(f"{source}: tensor {key} contains NaN or infinite values")
        tensors[key] = value
    if progress:
        print(f"writing {target} ...", file=sys.stderr)
    save_safetensors(model, target, tensors)
    return {
        "tensors": len(tensors),
        "aliases_dropped": len(aliases),
        "parameters": sum(t.numel() for t in tensors.values()),
        "bytes": target.stat().st_size,
        "preset": matching_preset(config) or "custom",
        "ignored_entries": ignored,
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="convert-checkpoint",
        description="Convert an original CUT3R/TTT3R .pth checkpoint "
        "(e.g. cut3r_512_dpt_4_64.pth) to safetensors.",
    )
    parser.add_argument("source", type=Path, help="original checkpoint (.pth)")
    parser.add_argument("target", type=Path, help="output file (.safetensors)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.target.suffix != ".safetensors":
        parser.error(f"the output name must end in .safetensors, got {args.target}")
    if args.target.exists() and not args.overwrite:
        parser.error(f"{args.target} exists; pass --overwrite to replace it")
    try:
        summary = convert(args.source, args.target, progress=not args.quiet)
    except (TTT3RCheckpointError, TTT3RConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.target}: {summary['tensors']} tensors, {summary['parameters']:,} parameters, "
        f"{summary['bytes'] / 1e9:.2f} GB, config {summary['preset']}; "
        f"{summary['aliases_dropped']} alias keys stored once; "
        f"ignored entries: {', '.join(summary['ignored_entries']) or 'none'}; "
        f"{summary['seconds']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
