"""The heads-up display: frame-rate and latency bookkeeping, and drawing text over the frame.

Latency is what the player feels: the time from reading the key state to the frame being
flipped on screen. The previous frame's cache refresh is part of it only when it did not fit in
the wait for the tick and rides along this frame's first model call (docs/design.md, "Inference").
FPS is measured over the whole loop, waiting included.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np
import pygame

WINDOW = 30  # frames the on-screen FPS and latency are averaged over (about 1-2 s of play)


class FrameStats:
    """Per-frame timings: a short window for the HUD, every frame for the final summary."""

    def __init__(self) -> None:
        self._ticks: deque[float] = deque(maxlen=WINDOW + 1)
        self._recent: deque[float] = deque(maxlen=WINDOW)
        self.latencies: list[float] = []  # ms, every displayed frame
        self.started: float | None = None  # when the first frame's keys were read (start-up excluded)
        self.last = 0.0  # when the last frame was flipped

    def frame(self, latency_ms: float) -> None:
        """Count one displayed frame that took ``latency_ms`` from key read to flip."""
        now = time.perf_counter()
        if self.started is None:
            self.started = now - latency_ms / 1e3
        self.last = now
        self._ticks.append(now)
        self._recent.append(latency_ms)
        self.latencies.append(latency_ms)

    @property
    def fps(self) -> float:
        """Frames per second over the last WINDOW frames."""
        if len(self._ticks) < 2:
            return 0.0
        return (len(self._ticks) - 1) / max(self._ticks[-1] - self._ticks[0], 1e-9)

    @property
    def latency_ms(self) -> float:
        return float(np.mean(self._recent)) if self._recent else 0.0

    def summary(self) -> dict[str, float]:
        """Whole-run numbers (first key read to last flip): frames, seconds, mean FPS, latency mean /
        median / 95th percentile."""
        n = len(self.latencies)
        wall = self.last - self.started if self.started is not None else 0.0
        lat = np.asarray(self.latencies) if n else np.zeros(1)
        return {"frames": n, "seconds": wall, "fps": n / wall if wall > 0 else 0.0,
                "latency_ms": float(lat.mean()), "latency_p50_ms": float(np.percentile(lat, 50)),
                "latency_p95_ms": float(np.percentile(lat, 95))}


class Hud:
    """Lines of text on a translucent box (play puts it in the strip below the frame); toggled by
    ``visible``."""

    def __init__(self, size: int = 18, visible: bool = True) -> None:
        pygame.font.init()
        self.font = pygame.font.Font(None, size)  # pygame's bundled font: no system fonts needed
        self.visible = visible

    def height(self, lines: int) -> int:
        """Pixels that ``lines`` lines of text take (the window's strip for them)."""
        return lines * self.font.get_linesize() + 6

    def draw(self, surface: pygame.Surface, lines: list[str], at: tuple[int, int] = (0, 0)) -> None:
        """The lines in a box whose top-left corner is ``at`` (+4 px)."""
        if not self.visible or not lines:
            return
        rendered = [self.font.render(line, True, (255, 255, 255)) for line in lines]
        width = max(r.get_width() for r in rendered) + 8
        height = sum(r.get_height() for r in rendered) + 6
        box = pygame.Surface((width, height), pygame.SRCALPHA)
        box.fill((0, 0, 0, 150))  # translucent so the frame stays visible behind the text
        surface.blit(box, (at[0] + 4, at[1] + 4))
        y = at[1] + 7
        for r in rendered:
            surface.blit(r, (at[0] + 8, y))
            y += r.get_height()
