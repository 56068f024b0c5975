"""Choosing the number of CPU threads by what a second thread actually buys.

torch starts with one thread per core. At this model size a second thread makes a frame only a
few percent faster, and when another process is busy on the other core, two threads are far
slower than one: they wait for each other at every op (play measured 40 FPS on one thread and
3-9 FPS on two beside a busy process). So the engine times a few frames at each candidate count
and keeps the fewest threads within ``min_gain`` of the fastest, and play shows the choice.
``--threads`` overrides it.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field

import torch

MIN_GAIN = 1.25  # a thread more must make frames at least this much faster to be kept


@dataclass
class ThreadChoice:
    threads: int
    frame_ms: dict[int, float] = field(default_factory=dict)  # median ms per frame, per thread count
    reason: str = ""

    def label(self) -> str:
        timed = ", ".join(f"{n}: {ms:.0f} ms" for n, ms in sorted(self.frame_ms.items()))
        return f"threads {self.threads} ({self.reason}{'; ' + timed if timed else ''})"


def candidates() -> list[int]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return sorted({1, max(1, cores)})


def choose_threads(time_frames, counts: list[int] | None = None, min_gain: float = MIN_GAIN) -> ThreadChoice:
    """``time_frames()`` -> per-frame seconds of a few throw-away frames (e.g. ``Engine.time_frames``),
    run once at each thread count; the fewest threads within ``min_gain`` of the fastest win.
    Leaves torch set to the chosen count."""
    counts = counts or candidates()
    if len(counts) == 1:
        torch.set_num_threads(counts[0])
        return ThreadChoice(counts[0], reason="one core")
    ms: dict[int, float] = {}
    for n in counts:
        torch.set_num_threads(n)
        ms[n] = 1e3 * statistics.median(time_frames())
    best = min(ms.values())
    pick = min(n for n in counts if ms[n] <= best * min_gain)
    torch.set_num_threads(pick)
    more = max(counts)
    reason = (f"auto: {more} threads only {ms[pick] / ms[more]:.2f}x as fast" if pick < more
              else f"auto: {pick} threads were {ms[min(counts)] / ms[pick]:.2f}x faster than 1")
    return ThreadChoice(pick, ms, reason)
