"""Running recording sessions in worker processes, and stopping them cleanly on signals.

SIGINT and SIGTERM never kill a recording process outright: they set a :class:`Stop` flag that
the session checks after every step, so the chunk in flight is flushed and the episode closed.
With several workers, the parent forwards its stop to them through a shared event, and each
worker also catches the signal itself (Ctrl-C in a terminal reaches the whole process group).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_lib
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any

# session(cfg, frame_budget, episode_budget, episode_indices, base_seed, stop, report) -> (frames, episodes)
Session = Callable[..., tuple[int, int]]
Report = Callable[[int, int], None]  # (new frames, new episodes)


class Stop:
    """A stop flag set from a signal handler (a plain attribute: safe to set there)."""

    def __init__(self, event: Any = None) -> None:
        self.flag = False
        self.event = event  # a multiprocessing.Event shared with the parent, if any

    def __call__(self) -> bool:
        return self.flag or (self.event is not None and self.event.is_set())

    def install(self) -> dict[int, Any]:
        """Make SIGINT and SIGTERM set the flag instead of killing the process.
        Returns the previous handlers (for :func:`restore_signals`)."""

        def handler(signum: int, frame: Any) -> None:
            self.flag = True

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def restore_signals(previous: dict[int, Any]) -> None:
    """Put back the handlers :meth:`Stop.install` replaced."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def share(total: int | None, workers: int, w: int) -> int | None:
    """Worker ``w``'s part of a budget split as evenly as possible (None: no budget)."""
    return None if total is None else total // workers + (1 if w < total % workers else 0)


def run_workers(
    session: Session,
    cfg: Any,
    frames: int | None,
    episodes: int | None,
    workers: int,
    n_existing: int,
    base_seed: int,
    stop: Stop,
    report: Report,
) -> tuple[int, int]:
    """Run ``session`` in ``workers`` processes; worker w records episodes n_existing + w + k * workers.

    Returns (frames, episodes) recorded by all of them. A worker's exception is re-raised here
    as a RuntimeError naming it (with its traceback when RECORD_DEBUG is set).
    """
    ctx = mp.get_context("spawn")  # fresh interpreters: game libraries and fork do not mix well
    messages = ctx.Queue()
    stop_event = ctx.Event()
    procs = [
        ctx.Process(
            target=_worker_main,
            args=(session, cfg, w, workers, share(frames, workers, w), share(episodes, workers, w),
                  n_existing, base_seed, messages, stop_event),
        )
        for w in range(workers)
    ]  # fmt: skip
    for p in procs:
        p.start()
    finished: set[int] = set()
    errors: list[str] = []
    got_frames = got_episodes = 0
    while len(finished) < workers:
        if stop():
            stop_event.set()
        try:
            kind, w, a, b = messages.get(timeout=0.2)
        except queue_lib.Empty:
            # A worker killed from outside sends nothing: notice it by its exit code.
            finished |= {w for w, p in enumerate(procs) if p.exitcode is not None}
            continue
        if kind == "progress":
            got_frames, got_episodes = got_frames + a, got_episodes + b
            report(a, b)
        elif kind == "error":
            errors.append(b)
            finished.add(w)
        else:
            finished.add(w)
    for p in procs:
        p.join()
    while not messages.empty():  # progress sent just before a worker's exit was noticed
        kind, w, a, b = messages.get()
        if kind == "progress":
            got_frames, got_episodes = got_frames + a, got_episodes + b
            report(a, b)
    if errors:  # the exception's own line; the whole traceback only where it helps (RECORD_DEBUG=1)
        lines = errors[0].strip().splitlines()
        detail = errors[0] if os.environ.get("RECORD_DEBUG") else lines[-1]
        raise RuntimeError(f"a recording worker failed: {detail} (RECORD_DEBUG=1 shows its traceback)")
    return got_frames, got_episodes


def _worker_main(
    session: Session,
    cfg: Any,
    w: int,
    workers: int,
    frame_budget: int | None,
    episode_budget: int | None,
    n_existing: int,
    base_seed: int,
    messages: Any,
    stop_event: Any,
) -> None:
    """Entry point of a worker process: run a session, report progress through ``messages``."""
    stop = Stop(stop_event)
    stop.install()
    pending = [0, 0]
    last = time.monotonic()

    def report(df: int, de: int) -> None:
        nonlocal last
        pending[0] += df
        pending[1] += de
        if de or time.monotonic() - last > 0.25:  # batched: a queue message per frame is too many
            messages.put(("progress", w, pending[0], pending[1]))
            pending[:] = [0, 0]
            last = time.monotonic()

    try:
        session(
            cfg, frame_budget, episode_budget, lambda j: n_existing + w + j * workers, base_seed, stop, report
        )
        messages.put(("progress", w, pending[0], pending[1]))
        messages.put(("done", w, 0, 0))
    except Exception:  # noqa: BLE001  (the parent prints it; a worker must always answer)
        messages.put(("error", w, 0, traceback.format_exc()))
