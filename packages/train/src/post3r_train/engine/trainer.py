"""The training loop: `fit` trains a `TrainModule`.

One code path serves one process and DDP: collectives are no-ops alone. Each optimiser step
ends with a single all-reduce that carries the loss, its parts, a non-finite flag, the corrupt-
sample counter and the stop request (signal or time limit), so every rank takes the same
decision at the same step boundary. Validation is `validation.run_validation`.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from post3r_backbone.allocator import keep_freed_memory_for
from post3r_train.engine.batches import (
    BatchStream,
    TrainLoaderFactory,
    ValLoaderFactory,
    batch_keys,
    batch_size,
)
from post3r_train.engine.checkpoint import (
    LAST,
    find_checkpoint,
    prune_checkpoints,
    publish_as,
    read_checkpoint,
    save_checkpoint,
    step_checkpoint_name,
)
from post3r_train.engine.distributed import (
    DistEnv,
    all_gather_objects,
    all_reduce_sum,
    any_rank,
    broadcast_object,
    check_ranks_agree,
    init_distributed,
    shutdown_distributed,
)
from post3r_train.engine.loggers import RunLogger, WandbSettings
from post3r_train.engine.module import TrainModule, frozen_names, move_to_device
from post3r_train.engine.rng import RandomStream, capture_rng, restore_rng, seed_everything
from post3r_train.engine.rundir import RunDir, run_dir_of_checkpoint
from post3r_train.engine.runlock import RunDirLockedError, RunLock
from post3r_train.engine.schedule import lr_factor
from post3r_train.engine.signals import PreemptionWatch
from post3r_train.engine.trainer_config import OptimConfig, TrainerConfig
from post3r_train.engine.validation import autocast, run_validation
from post3r_train.errors import CheckpointWriteError, NonFiniteLossError

log = logging.getLogger("post3r_train.engine")


@dataclass
class FitResult:
    """What `fit` did: the step it reached, why it stopped, its last validation metrics.

    Every rank gets one; `rank` says which (report on rank 0 only)."""

    step: int
    stop_reason: str
    val_metrics: dict[str, float] = field(default_factory=dict)
    run_dir: Path | None = None
    checkpoint: Path | None = None
    nan_skipped: int = 0
    data_skipped: int = 0
    rank: int = 0


@dataclass
class _LocalStep:
    """One rank's sums over the batches of a step, before the all-reduce."""

    loss: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)
    keys: list[Any] = field(default_factory=list)
    skipped: int = 0
    samples: int = 0


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint to continue from: its file (named in errors) and what it holds."""

    path: Path
    payload: Mapping[str, Any]


@dataclass(frozen=True)
class _StepStats:
    """A step as every rank sees it: figures averaged (counts summed) over ranks."""

    loss: float
    nonfinite: bool
    skipped: int
    stop: bool
    parts: dict[str, float]
    grad_norm: float
    samples: int
    lr: float


def fit(
    module: TrainModule,
    train_loader: TrainLoaderFactory,
    val_loader: ValLoaderFactory | None = None,
    *,
    trainer: TrainerConfig | None = None,
    optim: OptimConfig | None = None,
    seed: int = 0,
    log_dir: Path | str | None = None,
    experiment: str = "run",
    config: Any = None,
    resume: Path | str | None = None,
    wandb: WandbSettings | None = None,
    tensorboard: bool = True,
    env: DistEnv | None = None,
) -> FitResult:
    """Train `module`; the entry point the CLI calls on every rank.

    `log_dir`/`experiment` name the run directory (none: no logs, no checkpoints). `config` is
    the resolved run config (an OmegaConf node, a dict or YAML text) saved as config.yaml.
    `resume` is a run directory or checkpoint (`--continue`): training continues from it, in
    its run directory. `env` is the process group from `init_distributed` (created here and
    torn down at the end when omitted).
    """
    trainer, optim = trainer or TrainerConfig(), optim or OptimConfig()
    trainer.validate()
    optim.validate()
    own_env = env is None
    env = env or init_distributed(trainer.accelerator, trainer.dist_timeout_s)
    run = logger = engine = lock = None
    fresh = False
    try:
        # Everything that can refuse the run is checked before the run directory is touched,
        # so a failed --continue leaves it byte for byte as it was.
        start, resumed_run = _read_resume(env, resume)
        engine = Trainer(module, trainer, optim, env=env, seed=seed)
        if start is not None:
            engine.restore(start.payload, str(start.path))
        run, lock, fresh = _claim_run(env, resumed_run, log_dir, experiment)
        if run is not None and env.is_main:
            resume_step = None if start is None else int(start.payload["step"])
            logger = RunLogger.start(run, config, resume_step, tensorboard=tensorboard, wandb=wandb)
        engine.run, engine.logger = run, logger
        return engine.fit(train_loader, val_loader, start)
    except BaseException:
        step = None if engine is None else engine.step  # a run exists only once engine does
        if run is not None and fresh and step == 0:
            if logger is not None:
                logger.close()
                logger = None
            _remove_unstarted_run(run, env)
        elif run is not None:
            run.record_failure(env.rank, step)
        raise
    finally:
        if logger is not None:
            logger.close()
        if lock is not None:
            lock.release()
        if own_env:
            shutdown_distributed(env)


class _TrainingStep(nn.Module):
    """Routes DDP's forward to `training_step`, so gradients are reduced as DDP expects."""

    def __init__(self, module: TrainModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        return self.module.training_step(batch)


class Trainer:
    """The state of one training run (module, optimiser, schedule, step) and its loop."""

    def __init__(
        self,
        module: TrainModule,
        trainer: TrainerConfig,
        optim: OptimConfig,
        *,
        env: DistEnv,
        run: RunDir | None = None,
        logger: RunLogger | None = None,
        seed: int = 0,
    ) -> None:
        self.cfg, self.optim_cfg, self.env = trainer, optim, env
        self.run, self.logger, self.seed = run, logger, seed
        self.precision = trainer.precision_mode
        torch.set_float32_matmul_precision(trainer.matmul_precision)
        if trainer.cpu_threads is not None and env.device.type == "cpu":
            torch.set_num_threads(trainer.cpu_threads)
        if trainer.cpu_keep_freed_memory:
            keep_freed_memory_for(env.device)
        if trainer.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.module = module.to(env.device)
        self.params = [p for p in module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"{type(module).__name__} has no parameter that requires a gradient")
        scale = env.world_size if trainer.scale_lr_with_world_size else 1
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=optim.lr * scale,
            betas=(optim.betas[0], optim.betas[1]),
            eps=optim.eps,
            weight_decay=optim.weight_decay,
        )
        schedule = functools.partial(lr_factor, optim=optim, max_steps=trainer.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.precision == "16")
        self.metrics = module.make_metrics().to(env.device)
        self.metrics.persistent(True)
        self.net: Any = self._wrap(_TrainingStep(module))  # DistributedDataParallel or not
        self.step = 0
        self.data_position = 0  # batches this rank has consumed
        self.nan_skipped = 0
        self.data_skipped = 0
        self.val_metrics: dict[str, float] = {}
        self.checkpoint: Path | None = None
        self.data_rng = RandomStream(seed)  # replaced by `_seed` when training starts
        self._saved_step: int | None = None
        self._checked_first_step = False
        self._restored = False

    # ----------------------------------------------------------------------------------- set-up

    def _wrap(self, net: _TrainingStep) -> nn.Module:
        if not self.env.distributed:
            return net
        frozen = [f"module.{name}" for name in sorted(frozen_names(self.module))]
        # Frozen weights are loaded identically on every rank: skip their broadcast.
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(net, frozen)
        cuda = self.env.device.type == "cuda"
        return DistributedDataParallel(
            net,
            device_ids=[self.env.device.index] if cuda else None,
            find_unused_parameters=self.cfg.find_unused_parameters,
            gradient_as_bucket_view=True,
        )

    def restore(self, payload: Mapping[str, Any], source: str) -> None:
        """Load weights, optimiser, schedule, counters and metric state (RNG comes later)."""
        self.module.load_trainable_state_dict(payload["model"], source=source)
        saved_params = sum(len(g["params"]) for g in payload["optimizer"]["param_groups"])
        if saved_params != len(self.params):
            raise ValueError(
                f"{source}: its optimiser state covers {saved_params} parameters, the model "
                f"trains {len(self.params)} (different frozen/trainable split?)"
            )
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        if payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        self.step = int(payload["step"])
        self.data_position = int(payload["data_position"])
        self.nan_skipped = int(payload["counters"]["nan_skipped"])
        self.data_skipped = int(payload["counters"]["data_skipped"])
        self.val_metrics = dict(payload["metrics"]["values"])
        states = payload["metrics"]["states"]
        if len(states) == self.env.world_size:
            self.metrics.load_state_dict(states[self.env.rank])
        self._saved_step = self.step
        self.checkpoint = Path(source)
        self._restored = True

    def _seed(self, payload: Mapping[str, Any] | None) -> None:
        """Seed the model's and the data loader's random streams, or restore them."""
        states = None if payload is None else payload["rng"]
        if states is not None and len(states) == self.env.world_size:
            restore_rng(states[self.env.rank])
            self.data_rng.state = states[self.env.rank]["data"]
            return
        if states is not None:
            log.warning(
                "checkpoint was written by %d processes, this run has %d: random streams are "
                "re-seeded, so the continuation is not bit-identical",
                len(states),
                self.env.world_size,
            )
        seed = self.seed + 1_000_003 * self.step + self.env.rank
        seed_everything(seed)
        self.data_rng = RandomStream(seed + 7_919)

    # ------------------------------------------------------------------------------------- loop

    def fit(
        self,
        train_loader: TrainLoaderFactory,
        val_loader: ValLoaderFactory | None = None,
        resume: ResumePoint | None = None,
    ) -> FitResult:
        """Train until `trainer.max_steps`, a preemption signal or `trainer.max_time`."""
        payload = None if resume is None else resume.payload
        if resume is not None and not self._restored:
            self.restore(resume.payload, str(resume.path))
        check_ranks_agree(self.step, "the step to start from", self.env)
        self._seed(payload)
        stream = BatchStream(train_loader, self.data_position, self.data_rng)
        self._announce()
        deadline = None if self.cfg.max_time_s is None else time.monotonic() + self.cfg.max_time_s
        reason = "max_steps"
        timer = _RateMeter()
        self.module.train()
        with PreemptionWatch() as watch, self._progress_bar() as bar:
            while self.step < self.cfg.max_steps:
                with timer:
                    stats = self._train_step(stream, lambda: watch.requested or _past(deadline))
                self._after_step(stats, timer, bar)
                if val_loader is not None and self._due(self.cfg.val_check_interval):
                    self._validate(val_loader)
                if self._due(self.cfg.checkpoint_every_n_steps):
                    self._save("periodic")
                if stats.stop:
                    reason = _stop_reason(watch, deadline)
                    self._save(reason)
                    log.info("stopping at step %d (%s)", self.step, reason)
                    break
        check_ranks_agree(self.step, "the step training ended at", self.env)
        return FitResult(
            step=self.step,
            stop_reason=reason,
            val_metrics=dict(self.val_metrics),
            run_dir=None if self.run is None else self.run.root,
            checkpoint=self.checkpoint,
            nan_skipped=self.nan_skipped,
            data_skipped=self.data_skipped,
            rank=self.env.rank,
        )

    def _due(self, interval: int) -> bool:
        return self.step % interval == 0 or self.step == self.cfg.max_steps

    def _train_step(self, stream: BatchStream, stop: Callable[[], bool]) -> _StepStats:
        """One optimiser step over `accumulate_grad_batches` batches; rank-averaged stats."""
        self.optimizer.zero_grad(set_to_none=True)
        local = self._forward_backward(stream)
        if not self._checked_first_step:
            self._check_first_step(sorted(local.parts), local.samples)
        self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip_gradients()
        stats = self._reduce(local, grad_norm, stop())
        if stats.nonfinite:
            self.optimizer.zero_grad(set_to_none=True)
            self._handle_nonfinite(local.keys, stats)
        else:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        with warnings.catch_warnings():
            # A skipped update (non-finite, or GradScaler overflow) still advances the schedule.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        self.step += 1
        self.data_position = stream.position
        self.data_skipped += stats.skipped
        return stats

    def _forward_backward(self, stream: BatchStream) -> _LocalStep:
        """Forward and backward over this rank's batches of one step (loss and parts summed)."""
        accumulate = self.cfg.accumulate_grad_batches
        local = _LocalStep(loss=torch.zeros((), device=self.env.device))
        for index in range(accumulate):
            batch = stream.next()
            local.keys.extend(batch_keys(batch))
            local.samples += batch_size(batch)
            batch = move_to_device(batch, self.env.device)
            # Gradients are all-reduced once per step, on its last batch.
            defer = self.env.distributed and index < accumulate - 1
            with self.net.no_sync() if defer else contextlib.nullcontext():
                with autocast(self.env.device, self.precision):
                    loss, parts = self.net(batch)
                _check_loss(loss, self.module)
                self.scaler.scale(loss.float() / accumulate).backward()
            local.loss += loss.detach().float()
            for name, value in parts.items():
                value = torch.as_tensor(value, device=self.env.device).detach().float()
                local.parts[name] = local.parts.get(name, 0) + value
        local.skipped += stream.skipped()
        return local

    def _reduce(self, local: _LocalStep, grad_norm: Tensor, stop: bool) -> _StepStats:
        """One all-reduce carries every per-step figure and decision, so ranks agree on them."""
        accumulate, world = self.cfg.accumulate_grad_batches, self.env.world_size
        finite = torch.isfinite(local.loss)
        if self.precision != "16":  # under fp16 the GradScaler owns overflowing gradients
            finite = finite & torch.isfinite(grad_norm)
        names = sorted(local.parts)
        counts = torch.tensor([float(local.skipped), float(stop)], device=self.env.device)
        values = torch.stack(
            [
                local.loss / accumulate,
                (~finite).float(),
                *counts,
                *[local.parts[name] / accumulate for name in names],
            ]
        )
        total = all_reduce_sum(values, self.env).cpu()
        return _StepStats(
            loss=float(total[0]) / world,
            nonfinite=bool(total[1] > 0),
            skipped=int(total[2]),
            stop=bool(total[3] > 0),
            parts={name: float(total[4 + i]) / world for i, name in enumerate(names)},
            grad_norm=float(grad_norm),
            samples=local.samples * world,
            lr=float(self.scheduler.get_last_lr()[0]),
        )

    def _clip_gradients(self) -> Tensor:
        """Total gradient norm (before clipping, when `gradient_clip_val` is set)."""
        if self.cfg.gradient_clip_val is not None:
            return nn.utils.clip_grad_norm_(self.params, self.cfg.gradient_clip_val)
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.env.device)
        return nn.utils.get_total_norm(grads)

    def _check_first_step(self, part_names: list[str], samples: int) -> None:
        """Catch what would otherwise hang or crash DDP later, with a readable message."""
        self._checked_first_step = True
        if self.env.is_main:
            log.info(
                "effective batch: %d samples per step (%d per process x %d processes)",
                samples * self.env.world_size,
                samples,
                self.env.world_size,
            )
        names = all_gather_objects(part_names, self.env)
        if any(n != names[0] for n in names):
            raise RuntimeError(f"ranks log different loss parts: {names}; keep the keys fixed")
        if self.cfg.find_unused_parameters:
            return
        unused = [
            n for n, p in self.module.named_parameters() if p.requires_grad and p.grad is None
        ]
        if not unused:
            return
        message = (
            f"{len(unused)} trainable parameter(s) got no gradient in the first step: "
            f"{', '.join(unused[:10])}{' ...' if len(unused) > 10 else ''}. DDP needs every "
            "trainable parameter used each step: freeze them (requires_grad_(False)), remove "
            "them, or set trainer.find_unused_parameters=true (slower)"
        )
        if self.env.distributed:
            raise RuntimeError(message)
        log.warning("%s (fine in one process, an error under DDP)", message)

    def _handle_nonfinite(self, keys: list[Any], stats: _StepStats) -> None:
        step = self.step + 1
        where = [k for rank_keys in all_gather_objects(keys, self.env) for k in rank_keys]
        batch_text = ", ".join(map(str, where[:20])) if where else "(batches carry no __key__)"
        detail = f"loss {stats.loss}, grad norm {stats.grad_norm}; batch keys: {batch_text}"
        if self.cfg.nan_policy == "skip" and self.nan_skipped < self.cfg.max_nan_skips:
            self.nan_skipped += 1
            if self.env.is_main:
                log.warning(
                    "step %d: non-finite loss or gradient, update skipped (%d/%d): %s",
                    step,
                    self.nan_skipped,
                    self.cfg.max_nan_skips,
                    detail,
                )
            return
        why = (
            f"more than trainer.max_nan_skips={self.cfg.max_nan_skips} steps were skipped"
            if self.cfg.nan_policy == "skip"
            else "trainer.nan_policy=stop"
        )
        kept = f"; the last good checkpoint is {self.checkpoint}" if self.checkpoint else ""
        raise NonFiniteLossError(
            f"step {step}: non-finite loss or gradient ({why}): {detail}{kept}"
        )

    def _after_step(self, stats: _StepStats, timer: _RateMeter, bar: tqdm) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{stats.loss:.4g}", lr=f"{stats.lr:.2e}", refresh=False)
        if self.step % self.cfg.log_every_n_steps and self.step != self.cfg.max_steps:
            return
        steps_per_s = timer.rate()
        values = {
            "train/loss": stats.loss,
            **{f"train/{name}": value for name, value in stats.parts.items()},
            "train/lr": stats.lr,
            "train/grad_norm": stats.grad_norm,
            "train/steps_per_s": steps_per_s,
            "train/samples_per_s": steps_per_s * stats.samples,
            "train/nan_skipped": float(self.nan_skipped),
            "data/skipped": float(self.data_skipped),
        }
        if self.logger is not None:
            self.logger.log(self.step, values)

    def _validate(self, val_loader: ValLoaderFactory) -> None:
        visuals = None
        if self.run is not None and self.env.is_main:
            visuals = self.run.visuals / f"step={self.step:06d}"
        values, skipped = run_validation(
            self.module,
            self.metrics,
            val_loader,
            self.env,
            precision=self.precision,
            limit=self.cfg.limit_val_batches,
            visualize_dir=visuals,
            step=self.step,
            progress=self.cfg.progress_bar and self.env.is_main,
        )
        values["val/data_skipped"] = float(skipped)
        self.val_metrics = values
        if self.logger is not None:
            self.logger.log(self.step, values)
            if visuals is not None and visuals.is_dir():
                self.logger.log_images(self.step, visuals)
        if self.env.is_main:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
            log.info("step %d validation: %s", self.step, shown)

    # ------------------------------------------------------------------------------ checkpoints

    def _save(self, reason: str) -> None:
        """Write step=NNNNNN.ckpt and last.ckpt (rank 0); every rank learns the outcome."""
        if self.run is None or self._saved_step == self.step:
            return
        rng = all_gather_objects({**capture_rng(), "data": self.data_rng.state}, self.env)
        metric_states = all_gather_objects(_cpu(self.metrics.state_dict()), self.env)
        error = None
        path = self.run.checkpoints / step_checkpoint_name(self.step)
        if self.env.is_main:
            try:
                save_checkpoint(path, self._payload(rng, metric_states, reason))
                publish_as(path, self.run.checkpoints / LAST)
                prune_checkpoints(self.run.checkpoints, self.cfg.keep_checkpoints)
            except OSError as exc:
                error = exc
        if any_rank(error is not None, self.env):
            previous = f"{self.checkpoint} is intact" if self.checkpoint else "none was written"
            cause = f"{type(error).__name__}: {error}" if error else "see rank 0's error"
            raise CheckpointWriteError(
                f"writing {path} failed ({cause}); the previous checkpoint {previous}. "
                "Free disk space (or change --log-dir), then --continue the run"
            ) from error
        self._saved_step = self.step
        self.checkpoint = path

    def _payload(self, rng: list, metric_states: list, reason: str) -> dict[str, Any]:
        return {
            "step": self.step,
            "data_position": self.data_position,
            "world_size": self.env.world_size,
            "model": _cpu(self.module.trainable_state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": rng,
            "metrics": {"values": dict(self.val_metrics), "states": metric_states},
            "counters": {"nan_skipped": self.nan_skipped, "data_skipped": self.data_skipped},
            "module": f"{type(self.module).__module__}.{type(self.module).__qualname__}",
            "reason": reason,
            "saved_at": datetime.datetime.now().isoformat(timespec="seconds"),
        }

    # -------------------------------------------------------------------------------- reporting

    def _announce(self) -> None:
        if not self.env.is_main:
            return
        log.info(
            "training %s from step %d to %d on %d x %s (precision %s, accumulate %d, lr x%d)",
            type(self.module).__name__,
            self.step,
            self.cfg.max_steps,
            self.env.world_size,
            self.env.device.type,
            self.precision,
            self.cfg.accumulate_grad_batches,
            self.env.world_size if self.cfg.scale_lr_with_world_size else 1,
        )

    def _progress_bar(self) -> tqdm:
        """Steps with loss, rate and ETA (rank 0; a disabled bar elsewhere)."""
        return tqdm(
            disable=not (self.cfg.progress_bar and self.env.is_main),
            total=self.cfg.max_steps,
            initial=self.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            smoothing=0.1,
            # In a batch job's log file, a line every 30 s instead of ten per second.
            mininterval=0.1 if sys.stderr.isatty() else 30.0,
        )


class _RateMeter:
    """Training steps per second, counting only the time spent in training steps."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.steps = 0
        self._start = 0.0

    def __enter__(self) -> _RateMeter:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self._start
        self.steps += 1

    def rate(self) -> float:
        """Steps per second since the last call (then reset)."""
        rate = self.steps / self.seconds if self.seconds > 0 else 0.0
        self.seconds, self.steps = 0.0, 0
        return rate


def _stop_reason(watch: PreemptionWatch, deadline: float | None) -> str:
    """Why this rank stops early (the all-reduced stop flag was set by some rank)."""
    if watch.requested:
        return f"signal {watch.received}"
    return "max_time" if _past(deadline) else "stop requested by another rank"


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() > deadline


def _read_resume(
    env: DistEnv, resume: Path | str | None
) -> tuple[ResumePoint | None, RunDir | None]:
    """The checkpoint to resume (read only) and the run directory it belongs to."""
    if resume is None:
        return None, None
    path = find_checkpoint(Path(resume))
    start = ResumePoint(path, read_checkpoint(path))
    if env.is_main:
        log.info("resuming from %s (step %d)", path, start.payload["step"])
    return start, run_dir_of_checkpoint(path)


def _claim_run(
    env: DistEnv, resumed: RunDir | None, log_dir: Path | str | None, experiment: str
) -> tuple[RunDir | None, RunLock | None, bool]:
    """(run directory, its lock on rank 0, whether it is new): the resumed run's directory, or
    a new one under `log_dir` (none without either). Rank 0 creates and locks it; every rank
    gets its path, or the error that stopped rank 0."""
    if resumed is None and log_dir is None:
        return None, None, False
    root = lock = error = None
    if env.is_main:
        try:
            run = resumed or RunDir.create(Path(log_dir), experiment)  # type: ignore[arg-type]
            lock = RunLock.acquire(run.root)
            root = str(run.root)
        except (OSError, RunDirLockedError) as exc:
            error = exc
    root, message = broadcast_object((root, None if error is None else str(error)), env)
    if error is not None:
        raise error
    if message is not None:
        raise RunDirLockedError(f"rank 0 could not open the run directory: {message}")
    return RunDir(Path(root)), lock, resumed is None


def _remove_unstarted_run(run: RunDir, env: DistEnv) -> None:
    """A new run that failed before its first step holds nothing worth keeping (the error is
    on the console): remove it, so failed starts do not pile up in the log directory."""
    if env.is_main:
        shutil.rmtree(run.root, ignore_errors=True)
        log.info("removed %s: the run failed before its first step", run.root)


def _check_loss(loss: Any, module: nn.Module) -> None:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise TypeError(
            f"{type(module).__name__}.training_step must return (scalar loss tensor, dict of "
            f"parts); the loss has shape {shape}"
        )


def _cpu(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in state.items()}
