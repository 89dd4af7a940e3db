"""A tiny TrainModule and data streams for the engine's tests (also runnable as a script).

Regression on synthetic tensors: a frozen "backbone" (Linear + BatchNorm, never trained) feeds a
trainable head. Every sample is a pure function of its index, so data order and contents are
reproducible from a start position, which is what exact resume needs.

Script use (single process, under torchrun, or `--devices N` to launch N workers):
    python train_engine_toy.py --log-dir D --max-steps 6 [--continue RUN] [--sigterm-at 3] ...
With --resume-after-stop, a run stopped by a signal is continued from its run directory in the
same process (a preemption and a restart in one launch), up to twice.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchmetrics import MeanSquaredError, MetricCollection, SumMetric

from post3r_train.engine import (
    OptimConfig,
    TrainerConfig,
    TrainModule,
    fit,
    init_distributed,
    launch_local,
    needs_launch,
    seed_everything,
    shutdown_distributed,
)

FEATURES = 4
TRUE_WEIGHTS = torch.tensor([0.5, -1.0, 2.0, 0.25])


def sample(index: int) -> tuple[Tensor, Tensor]:
    """Sample `index`: input (FEATURES,) and target (1,), the same in every process."""
    generator = torch.Generator().manual_seed(10_007 + index)
    x = torch.randn(FEATURES, generator=generator)
    y = (x @ TRUE_WEIGHTS).reshape(1) + 0.01 * torch.randn(1, generator=generator)
    return x, y


def make_batch(indices: list[int]) -> dict:
    xs, ys = zip(*(sample(i) for i in indices), strict=True)
    return {"x": torch.stack(xs), "y": torch.stack(ys), "__key__": [f"s{i:05d}" for i in indices]}


class ToyModule(TrainModule):
    """Frozen features (Linear + BatchNorm) into a trainable head with dropout."""

    def __init__(
        self,
        hidden: int = 16,
        dropout: float = 0.1,
        sigterm_at: int | None = None,
        signal_parent: bool = False,
    ):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(FEATURES, 8), nn.BatchNorm1d(8))
        self.backbone.requires_grad_(False)
        self.head = nn.Sequential(
            nn.Linear(FEATURES + 8, hidden),
            nn.LayerNorm(hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )
        self.sigterm_at, self.signal_parent = sigterm_at, signal_parent
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            features = self.backbone.eval()(x)
        return self.head(torch.cat([x, features], dim=-1))

    def training_step(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        self.calls += 1
        if self.sigterm_at is not None and self.calls == self.sigterm_at:
            if self.signal_parent:
                signal_launcher_and_wait()
            else:
                os.kill(os.getpid(), signal.SIGTERM)
        error = self(batch["x"]).float() - batch["y"]
        loss = error.pow(2).mean()
        return loss, {"mse": loss.detach(), "abs": error.abs().mean().detach()}

    def validation_step(self, batch: dict, metrics: MetricCollection) -> dict[str, Tensor]:
        prediction = self(batch["x"]).float()
        metrics["mse"].update(prediction, batch["y"])
        metrics["count"].update(torch.tensor(float(len(batch["x"])), device=prediction.device))
        return {"prediction": prediction}

    def make_metrics(self) -> MetricCollection:
        return MetricCollection({"mse": MeanSquaredError(), "count": SumMetric()})

    def visualize(self, batch: dict, outputs: dict, directory: Path, step: int | None) -> None:
        values = outputs["prediction"].detach().cpu().flatten()
        pixels = ((values - values.min()) / (values.max() - values.min() + 1e-8) * 255).byte()
        directory.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.reshape(1, -1).repeat(8, 1).numpy()).save(directory / "pred.png")


def signal_launcher_and_wait(timeout: float = 60.0) -> None:
    """SIGTERM the launcher (as a scheduler would) and wait until it has forwarded the signal
    here, so the stop lands in this step whatever the forwarding latency."""
    received: list[int] = []
    recorder = signal.getsignal(signal.SIGTERM)  # the engine's PreemptionWatch

    def relay(signum: int, frame: object) -> None:
        received.append(signum)
        recorder(signum, frame)

    signal.signal(signal.SIGTERM, relay)
    try:
        os.kill(os.getppid(), signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while not received and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        signal.signal(signal.SIGTERM, recorder)
    if not received:
        raise TimeoutError(f"the launcher did not forward SIGTERM within {timeout} s")


def train_stream(
    rank: int,
    world: int,
    batch_size: int,
    nan_batches: frozenset[int] = frozenset(),
    step_sleep: float = 0.0,
):
    """Endless per-rank stream: global batch b holds samples of rank-interleaved blocks."""

    def factory(start: int) -> Iterator[dict]:
        # Like a DataLoader iterator: draw a base seed from torch's global generator on start.
        torch.empty((), dtype=torch.int64).random_()
        position = start
        while True:
            first = (position * world + rank) * batch_size
            batch = make_batch(list(range(first, first + batch_size)))
            if position in nan_batches:
                batch["x"] = torch.full_like(batch["x"], float("nan"))
            if step_sleep:
                time.sleep(step_sleep)
            position += 1
            yield batch

    return factory


def val_stream(rank: int, world: int, size: int, batch_size: int = 2):
    """Validation samples 10**6 + i for i < size, split by rank (uneven when size % world)."""

    def factory() -> Iterator[dict]:
        mine = [10**6 + i for i in range(size) if i % world == rank]
        for start in range(0, len(mine), batch_size):
            yield make_batch(mine[start : start + batch_size])

    return factory


def shard_stream(directory: Path, batch_size: int):
    """Batches read from `shard-*.npy` files; unreadable shards are skipped and counted in the
    loader's cumulative `num_skipped`, as post3r_data's loaders do."""

    class ShardLoader:
        def __init__(self, start: int) -> None:
            self.start, self.num_skipped = start, 0

        def __iter__(self) -> Iterator[dict]:
            position = 0
            while True:
                for path in sorted(Path(directory).glob("shard-*.npy")):
                    try:
                        indices = np.load(path).tolist()
                    except (ValueError, OSError, EOFError):
                        self.num_skipped += 1
                        continue
                    for first in range(0, len(indices), batch_size):
                        if position >= self.start:
                            yield make_batch(indices[first : first + batch_size])
                        position += 1

    return ShardLoader


def small_trainer(**overrides) -> TrainerConfig:
    settings = dict(
        max_steps=6,
        val_check_interval=3,
        log_every_n_steps=1,
        checkpoint_every_n_steps=2,
        accelerator="cpu",
        progress_bar=False,
    )
    settings.update(overrides)
    return TrainerConfig(**settings)


def small_optim(**overrides) -> OptimConfig:
    settings = dict(lr=1e-2, warmup_steps=2, decay_steps=20)
    settings.update(overrides)
    return OptimConfig(**settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--log-dir", type=Path, required=True)
    parser.add_argument("--continue", dest="resume", type=Path)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--val-size", type=int, default=5)
    parser.add_argument("--sigterm-at", type=int, help="rank 1 (or 0 alone) signals itself")
    parser.add_argument(
        "--launcher-sigterm-at",
        type=int,
        help="in the run continued after a stop, rank 1 signals the launcher at this call",
    )
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--checkpoint-every", type=int, default=2)
    parser.add_argument("--resume-after-stop", action="store_true", help="then --continue")
    args = parser.parse_args(argv)
    if needs_launch(args.devices):
        return launch_local(args.devices, sys.argv[1:], script=__file__)
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    env = init_distributed("cpu", timeout_s=120)
    try:
        signaller = 1 if env.world_size > 1 else 0
        resume = args.resume
        # Attempt 0 may be stopped by --sigterm-at, attempt 1 by --launcher-sigterm-at.
        for attempt in range(3):
            seed_everything(0)
            sigterm_at = [args.sigterm_at, args.launcher_sigterm_at, None][attempt]
            sigterm_at = sigterm_at if env.rank == signaller else None
            result = fit(
                ToyModule(sigterm_at=sigterm_at, signal_parent=attempt == 1),
                train_stream(env.rank, env.world_size, 4, step_sleep=args.step_sleep),
                val_stream(env.rank, env.world_size, args.val_size),
                trainer=small_trainer(
                    max_steps=args.max_steps,
                    checkpoint_every_n_steps=args.checkpoint_every,
                    dist_timeout_s=120,
                ),
                optim=small_optim(),
                log_dir=args.log_dir,
                experiment="toy",
                config={"toy": {"max_steps": args.max_steps}},
                resume=resume,
                env=env,
            )
            report = f"rank {env.rank} stopped at step {result.step}: {result.stop_reason}"
            print(report, flush=True)
            if result.stop_reason == "max_steps" or not args.resume_after_stop:
                break
            resume = result.run_dir
    finally:
        shutdown_distributed(env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
