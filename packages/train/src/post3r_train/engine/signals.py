"""Stop requests: SIGTERM / SIGUSR1 / SIGINT become a request the loop honours at the next step.

Schedulers send SIGTERM (SLURM at the time limit, Kubernetes on eviction) or a user-chosen signal
(`#SBATCH --signal=USR1@120`) some time before the hard kill; a user presses Ctrl+C (SIGINT).
Stopping mid-step would leave ranks in different collectives, so the handler only records the
signal; the engine then agrees on it with every rank, writes a checkpoint and returns. A second
Ctrl+C stops at once (KeyboardInterrupt). A repeat within `REPEAT_WINDOW_S` counts as the same
press: the elastic launcher forwards the terminal's SIGINT to workers that got it already.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from types import FrameType

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
REPEAT_WINDOW_S = 1.0


class PreemptionWatch:
    """Context manager that records preemption signals instead of dying of them."""

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS) -> None:
        self.signals = signals
        self.received: str | None = None
        self._interrupted_at: float | None = None
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
        if signum == signal.SIGINT:
            self._interrupt()
        self.received = self.received or signal.Signals(signum).name

    def _interrupt(self) -> None:
        """First Ctrl+C: say what happens; a later one: stop now."""
        now = time.monotonic()
        if self._interrupted_at is None:
            self._interrupted_at = now
            print(
                "\ninterrupted: saving a checkpoint after this step (Ctrl+C again stops at once)",
                file=sys.stderr,
                flush=True,
            )
        elif now - self._interrupted_at > REPEAT_WINDOW_S:
            raise KeyboardInterrupt

    @property
    def requested(self) -> bool:
        return self.received is not None
