"""Start N local training processes through PyTorch's elastic launcher (what torchrun runs).

`uv run apps/train ... trainer.devices=4` calls `launch_local(4, argv)`, which is
`torchrun --standalone --nproc-per-node 4 -m post3r_train <argv>` without leaving Python: a
standalone c10d rendezvous on a free local port, no restarts, SIGTERM/SIGUSR1 forwarded to the
workers (which checkpoint and exit) with time to finish before they are killed.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Sequence

log = logging.getLogger("post3r_train.engine")

FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def is_worker() -> bool:
    """True inside a process started by torchrun, `launch_local` or a multi-task `srun`."""
    from post3r_train.engine.distributed import launched_world

    return "TORCHELASTIC_RUN_ID" in os.environ or launched_world()[2] > 1


def needs_launch(devices: int) -> bool:
    """Whether `trainer.devices=devices` asks this (launcher) process to start workers."""
    return devices > 1 and not is_worker()


def launch_local(
    nproc: int,
    argv: Sequence[str],
    *,
    module: str = "post3r_train",
    script: str | None = None,
    shutdown_timeout_s: int = 120,
) -> int:
    """Run `python -m module *argv` (or `python script *argv`) as `nproc` DDP workers.

    Returns 0 when every worker succeeded, 1 otherwise (the failing rank's error is logged),
    and 128 + the signal number when this process was signalled (SIGTERM, SIGUSR1, ...): the
    launcher has then forwarded the signal and waited for the workers to checkpoint and exit.
    """
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    saved_env = dict(os.environ)
    _share_cpu_threads(nproc)
    target = [script] if script is not None else ["-m", module]
    args = get_args_parser().parse_args(
        [
            "--standalone",
            f"--nproc-per-node={nproc}",
            "--max-restarts=0",
            f"--signals-to-handle={FORWARDED_SIGNALS}",
            f"--shutdown-timeout={shutdown_timeout_s}",
            *target,
        ]
    )
    # Set after parsing: torchrun's parser would mistake worker flags for its own prefixes.
    args.training_script_args = list(argv)
    handled = [getattr(signal, name) for name in FORWARDED_SIGNALS.split(",")]
    saved = {sig: signal.getsignal(sig) for sig in handled}
    try:
        run(args)
        return 0
    except ChildFailedError as exc:
        log.error("%s", exc.format_msg())
        return 1
    except SignalException as exc:
        # Raised after the agent has forwarded the signal and the workers have stopped (or
        # were killed after `shutdown_timeout_s`): a preemption, not a crash to trace back.
        log.warning(
            "%s: the workers were asked to checkpoint and stop; --continue resumes the run",
            exc.sigval.name,
        )
        return 128 + int(exc.sigval)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        os.environ.clear()
        os.environ.update(saved_env)


def _share_cpu_threads(nproc: int) -> None:
    """Give each worker an equal share of the cores (torchrun would set 1 thread)."""
    if "OMP_NUM_THREADS" not in os.environ and nproc > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        os.environ["OMP_NUM_THREADS"] = str(max(1, (cores or 1) // nproc))
