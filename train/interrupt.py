"""Stopping a run without losing it: SIGTERM (what `kill`, job schedulers and torchrun send) and the
first Ctrl-C become a request that the training loop honours at the end of the current step, by
checkpointing and exporting exactly as a `max_minutes` stop does. Rerunning the same command then
continues bit-exactly. Without this, a killed run loses everything since its last checkpoint.

A second Ctrl-C raises KeyboardInterrupt at once (for a step that takes too long to finish).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType


class Stopped(Exception):
    """Raised by the loop after it saved a checkpoint and the export because a signal asked it to."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = signum, step
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}: checkpoint and "
                         "export saved; rerun the same command to go on from there")


class StopRequest:
    """Context manager: while inside, SIGINT/SIGTERM set `signum` instead of killing the process.

    Handlers can only be installed from the main thread; elsewhere (a test runner's worker thread)
    this does nothing and `signum` stays None.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now, losing the current step
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step (checkpoint + export); "
              "Ctrl-C again to stop at once", file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
