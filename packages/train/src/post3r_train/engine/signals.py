"""Preemption: turn SIGTERM / SIGUSR1 into a request the loop honours at the next step boundary.

Schedulers send SIGTERM (SLURM at the time limit, Kubernetes on eviction) or a user-chosen signal
(`#SBATCH --signal=USR1@120`) some time before the hard kill. Stopping mid-step would leave ranks
in different collectives, so the handler only records the signal; the engine then agrees on it
with every rank, writes a checkpoint and returns.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatch:
    """Context manager that records preemption signals instead of dying of them."""

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS) -> None:
        self.signals = signals
        self.received: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> PreemptionWatch:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.received is not None
