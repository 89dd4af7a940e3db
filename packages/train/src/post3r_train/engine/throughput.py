"""Engine throughput: steps and samples per second with 1, 2, ... processes (DDP) on CPU or GPU.

    python -m post3r_train.engine.throughput                 # 1 and 2 CPU processes
    python -m post3r_train.engine.throughput --processes 1 2 4 --accelerator gpu

    python -m post3r_train.engine.throughput --config smoke  # the real model and data

The default workload is a synthetic regression MLP (no data loading), so the figures measure the
engine: autocast, DDP gradient all-reduce, the per-step collective, logging. `--config` times a
run config's POST3R model with its data loaders instead. Each setting runs in fresh processes
started by `launch_local`; the first steps are warm-up and not counted. A plain PyTorch loop over
the same model and data in one process is the baseline.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics import MeanSquaredError, MetricCollection

from post3r_train.engine.batches import TrainLoaderFactory, batch_size
from post3r_train.engine.launch import launch_local
from post3r_train.engine.module import TrainModule, move_to_device
from post3r_train.engine.trainer import fit
from post3r_train.engine.trainer_config import OptimConfig, TrainerConfig


class RegressionMLP(TrainModule):
    """`depth` square layers of `width`, regressing a fixed random linear map."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.GELU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, width))

    def training_step(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        loss = nn.functional.mse_loss(self.net(batch["x"]).float(), batch["y"])
        return loss, {}

    def validation_step(self, batch: dict, metrics: MetricCollection) -> dict[str, Tensor]:
        metrics["mse"].update(self.net(batch["x"]).float(), batch["y"])
        return {}

    def make_metrics(self) -> MetricCollection:
        return MetricCollection({"mse": MeanSquaredError()})


def synthetic_batches(width: int, batch_size: int, seed: int) -> Iterator[dict]:
    generator = torch.Generator().manual_seed(seed)
    target = torch.randn(width, width, generator=generator) / width**0.5
    while True:
        x = torch.randn(batch_size, width, generator=generator)
        yield {"x": x, "y": x @ target}


def workload(args: argparse.Namespace) -> tuple[TrainModule, TrainLoaderFactory]:
    """The module and train-loader factory to time: the MLP, or a run config's real model."""
    torch.manual_seed(0)
    if args.config is None:
        module = RegressionMLP(args.width, args.depth)
        return module, lambda start: synthetic_batches(
            args.width, args.batch_size, seed=start + _rank()
        )
    from post3r_train.config import load_config
    from post3r_train.data import build_train_loader, checkpoint_aligned_epoch, prepare_data
    from post3r_train.model import POST3RModel

    cfg = load_config(args.config, [f"trainer.accelerator={args.accelerator}"])
    torch.manual_seed(cfg.seed)
    epoch = checkpoint_aligned_epoch(cfg)
    return POST3RModel.from_config(cfg), build_train_loader(
        cfg, prepare_data(cfg), batches_per_epoch=epoch
    )


def run_worker(args: argparse.Namespace) -> None:
    """One process of a setting: train, then rank 0 writes its per-step rates."""
    module, train_loader = workload(args)
    result = fit(
        module,
        train_loader,
        trainer=TrainerConfig(
            max_steps=args.warmup + args.steps,
            log_every_n_steps=1,
            val_check_interval=10**9,
            checkpoint_every_n_steps=10**9,
            accelerator=args.accelerator,
            precision=args.precision,
            progress_bar=False,
        ),
        optim=OptimConfig(lr=1e-3, warmup_steps=0),
        log_dir=Path(args.out) / f"p{args.nproc}",
        experiment="bench",
        tensorboard=False,
    )
    if result.run_dir is not None and result.rank == 0:
        with open(result.run_dir / "logs" / "metrics" / "metrics.csv") as file:
            rows = [r for r in csv.DictReader(file) if int(r["step"]) > args.warmup]
        steps = statistics.median(float(r["train/steps_per_s"]) for r in rows)
        samples = statistics.median(float(r["train/samples_per_s"]) for r in rows)
        summary = {"steps_per_s": steps, "samples_per_s": samples}
        (Path(args.out) / f"p{args.nproc}.json").write_text(json.dumps(summary))


def plain_loop(args: argparse.Namespace) -> dict[str, float]:
    """Baseline: the same model, data and optimiser in a bare loop, one process."""
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    module, train_loader = workload(args)
    module.to(device).train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    batches = _endless(train_loader)
    times, samples = [], 0
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        batch = move_to_device(next(batches), device)
        optimizer.zero_grad(set_to_none=True)
        loss, _ = module.training_step(batch)
        loss.backward()
        optimizer.step()
        loss.item()  # the engine reads the loss every step too
        times.append(time.perf_counter() - start)
        samples = batch_size(batch)
    steps = 1.0 / statistics.median(times[args.warmup :])
    return {"steps_per_s": steps, "samples_per_s": steps * samples}


SHARED = ("steps", "warmup", "width", "depth", "batch_size", "accelerator", "precision", "config")
"""Settings the launcher passes on to its workers."""


def _endless(train_loader: TrainLoaderFactory) -> Iterator[dict]:
    """Batches from position 0 on, restarting a loader that ends (one epoch per pass)."""
    position = 0
    while True:
        for batch in train_loader(position):
            position += 1
            yield batch


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=40, help="measured steps per setting")
    parser.add_argument("--warmup", type=int, default=10, help="uncounted first steps")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--precision", default="32")
    parser.add_argument("--threads", type=int, help="per process (default: cores / max procs)")
    parser.add_argument("--config", help="time a run config's real model and data (e.g. smoke)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--nproc", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # The same threads per process in every setting, so more processes means more cores used
    # (not a different BLAS threading), and no setting oversubscribes the machine.
    threads = args.threads or max(1, (cores or 1) // max(args.processes))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    what = f"MLP {args.depth}x{args.width}, batch {args.batch_size} per process"
    if args.config is not None:
        what = f"config {args.config} (POST3R model and its data loaders)"
    torch.set_num_threads(threads)
    print(
        f"engine benchmark: {what}, "
        f"{args.steps} steps after {args.warmup} warm-up, {args.accelerator}, precision "
        f"{args.precision}, {threads} thread(s) per process, {cores} cores (load average "
        f"{os.getloadavg()[0]:.1f}), torch {torch.__version__}"
    )
    baseline = plain_loop(args)
    print(_line("plain PyTorch loop, 1 process", baseline, "baseline"))
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for nproc in args.processes:
            shared = {name: getattr(args, name) for name in SHARED}
            worker = [f"--{k.replace('_', '-')}={v}" for k, v in shared.items() if v is not None]
            worker += ["--worker", f"--nproc={nproc}", f"--out={out}"]
            if launch_local(nproc, worker, module="post3r_train.engine.throughput") != 0:
                print(f"engine, {nproc} process(es): failed")
                continue
            results[nproc] = json.loads((Path(out) / f"p{nproc}.json").read_text())
            ratio = results[nproc]["samples_per_s"] / baseline["samples_per_s"]
            kind = "DDP " + ("nccl" if args.accelerator == "gpu" else "gloo") if nproc > 1 else ""
            label = f"engine, {nproc} process{'es' if nproc > 1 else ''} {kind}".rstrip()
            print(_line(label, results[nproc], f"{ratio:.2f}x baseline samples/s"))
    if 1 in results and len(results) > 1:
        for nproc, figures in results.items():
            if nproc > 1:
                speedup = figures["samples_per_s"] / results[1]["samples_per_s"]
                print(f"scaling 1 -> {nproc} processes: {speedup:.2f}x samples/s")
    return 0


def _line(label: str, figures: dict[str, float], note: str) -> str:
    return (
        f"{label:<36} {figures['steps_per_s']:8.2f} steps/s {figures['samples_per_s']:10.1f} "
        f"samples/s  ({note})"
    )


if __name__ == "__main__":
    raise SystemExit(main())
