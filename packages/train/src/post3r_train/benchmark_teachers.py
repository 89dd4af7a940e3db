"""`uv run apps/bench-train --config ytvis2021 --compare-teachers`: online vs cached 3D teacher.

In one run, for `model.teacher.name=ttt3r` (online: the frozen TTT3R runs on every clip) and
`cached` (its outputs arrive with the batch, read from `apps/cache-teacher`'s sidecar shards):

- steps/s, samples/s and peak memory of a training step (forward, backward, AdamW) on the device:
  on a GPU at the config's real sizes (the checkpoints if present, else random weights, said in the
  output), on a CPU at small sizes with the `tiny` TTT3R preset (`CPU_TINY`);
- FLOPs per training step at the config's real sizes, counted by `torch.utils.flop_counter` on
  the meta device (shapes only: no weights, no arithmetic, any machine);
- the online teacher's bf16-autocast vs float32 target difference and the cache's float16
  storage difference (CPU, `tiny` preset, random weights, a smooth random video).
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from post3r_train.bench_train import RANDOM_FROZEN, _timed, make_train_step, synthetic_batch
from post3r_train.config import load_config
from post3r_train.model import POST3RModel

TEACHERS = ("ttt3r", "cached")
ROW_NAMES = {"ttt3r": "online", "cached": "cached"}
# Small sizes for CPUs: the tiny TTT3R preset, a 4-block DINOv2 and 64 px frames.
CPU_TINY = [
    "model.teacher.preset=tiny",
    "model.teacher.image_size=64",
    "dataset.image_size=64",
    "dataset.batch_size=4",
    "model.encoder.image_size=56",
    "model.encoder.block=4",
    "model.encoder.timm_kwargs={embed_dim: 96, depth: 4, num_heads: 2}",
    "model.decoder_resolution=[32,32]",
    "trainer.precision=32",
]


@dataclass
class Row:
    name: str
    steps_per_s: float
    samples_per_s: float
    peak_memory_gb: float
    tflop_per_step: float


def frozen_weights_present(cfg: DictConfig) -> bool:
    """Whether the config's TTT3R checkpoint and DINOv2 weights are on disk."""
    files = [cfg.model.teacher.checkpoint]
    if cfg.model.encoder.name == "dinov2":
        files.append(cfg.model.encoder.weights)
    return all(f is not None and Path(f).is_file() for f in files)


def count_flops(config: str, overrides: Sequence[str]) -> float:
    """FLOPs of one training step (forward and backward) at the config's sizes, on meta."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = load_config(config, [*RANDOM_FROZEN, *overrides])
    with torch.device("meta"):
        model = POST3RModel.from_config(cfg).train()
    batch = synthetic_batch(cfg, torch.device("meta"))
    with FlopCounterMode(display=False) as counter:
        loss, _ = model.training_step(batch)
        loss.backward()
    return float(counter.get_total_flops())


def measure_steps(cfg: DictConfig, device: torch.device, steps: int, warmup: int) -> tuple:
    """(steps/s, peak memory in GiB) of training steps on synthetic batches."""
    _, _, train_step = make_train_step(cfg, device)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        train_step()
    seconds = _timed(train_step, steps, device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process, KiB
    return 1.0 / seconds, peak


def _smooth_video(frames: int, size: int, seed: int = 0) -> torch.Tensor:
    """(1, T, 3, size, size) in [0, 1]: coarse random colours, bilinearly upsampled, drifting."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 8, 8 + frames, generator=generator)
    wide = F.interpolate(coarse, size=(size, size + 4 * frames), mode="bilinear")
    return torch.stack([wide[..., 4 * t : 4 * t + size] for t in range(frames)], dim=1)


def precision_differences(frames: int = 8, size: int = 64) -> dict[str, float]:
    """Relative differences of the teacher's targets (tiny preset, random weights, CPU):
    bf16 autocast vs float32, and float16 storage vs float32. Each is mean |a - b| / mean |b|
    over pixels (pointmap, confidence) or matrix entries (camera-to-world)."""
    from post3r_train.teacher import TTT3RTeacher

    torch.manual_seed(0)
    backbone = TTT3RTeacher(preset="tiny", random_weights=True).backbone
    video = _smooth_video(frames, size)
    outputs = ["pts3d_world", "conf_world", "camera_to_world"]
    full, _ = backbone.forward_video(video, outputs=outputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half, _ = backbone.forward_video(video, outputs=outputs)

    def relative(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
        assert a is not None and b is not None  # asked for in `outputs`
        return float((a.float() - b.float()).abs().mean() / b.float().abs().mean())

    assert full.pts3d_world is not None and full.conf_world is not None  # in `outputs`

    return {
        "bf16 pointmap": relative(half.pts3d_world, full.pts3d_world),
        "bf16 confidence": relative(half.conf_world, full.conf_world),
        "bf16 camera_to_world": relative(half.camera_to_world, full.camera_to_world),
        "float16 storage pointmap": relative(full.pts3d_world.half(), full.pts3d_world),
        "float16 storage confidence": relative(full.conf_world.half(), full.conf_world),
    }


def compare_teachers(
    config: str, overrides: Sequence[str], device: torch.device, steps: int, warmup: int
) -> int:
    """Print the online-vs-cached table (and the precision differences); 0 on success."""
    real = load_config(config, list(overrides))
    random = not frozen_weights_present(real) or device.type != "cuda"
    sizes = [] if device.type == "cuda" else CPU_TINY
    frozen = RANDOM_FROZEN if random else []
    print(
        f"step time on {device.type}: "
        + ("the config's real sizes" if not sizes else "small sizes, tiny TTT3R (CPU_TINY)")
        + (", random frozen weights (checkpoint files absent or CPU)" if random else "")
    )
    rows = []
    # Cached first: on a CPU the peak is the process's resident maximum so far.
    for teacher in reversed(TEACHERS):
        print(f"running {ROW_NAMES[teacher]} ...", file=sys.stderr, flush=True)
        step_overrides = [*frozen, *overrides, *sizes, f"model.teacher.name={teacher}"]
        cfg = load_config(config, step_overrides)
        steps_per_s, peak = measure_steps(cfg, device, steps, warmup)
        flops = count_flops(config, [*overrides, f"model.teacher.name={teacher}"])
        rows.append(
            Row(
                ROW_NAMES[teacher],
                steps_per_s,
                steps_per_s * cfg.dataset.batch_size,
                peak,
                flops / 1e12,
            )
        )
    rows.reverse()
    print(format_rows(rows, real, device))
    online, cached = rows
    print(
        f"cached vs online: {cached.steps_per_s / online.steps_per_s:.2f}x the steps/s, "
        f"{online.tflop_per_step / cached.tflop_per_step:.2f}x fewer FLOPs per step"
    )
    print("precision of the targets (CPU, tiny TTT3R, random weights; mean |a-b| / mean |b|):")
    for name, value in precision_differences().items():
        print(f"  {name:<28} {value:.2e}")
    return 0


def format_rows(rows: list[Row], real: DictConfig, device: torch.device) -> str:
    d = real.dataset
    flops_at = f"TFLOP/step at {d.batch_size}x{d.chunk_size}x{d.image_size}px"
    memory = "peak GiB" if device.type == "cuda" else "peak RSS GiB"
    header = f"{'teacher':<8} {'steps/s':>8} {'samples/s':>10} {memory:>13} {flops_at:>30}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.name:<8} {r.steps_per_s:>8.3f} {r.samples_per_s:>10.2f} "
            f"{r.peak_memory_gb:>13.2f} {r.tflop_per_step:>30.4g}"
        )
    return "\n".join(lines)
