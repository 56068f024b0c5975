"""Recording a play session into the training dataset format (episodes/writer.py).

A recorded dream is data like any other: the controller of each frame (human, random, replay) is
stored, and the metadata's source says it came from a world model, not the real game. Episodes
start at a frame with action -1 (nothing pressed before it) and end when the world predicts an
episode end, when the player resets, or when recording stops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from episodes.writer import END_INTERRUPTED, END_TERMINATED, NULL_ACTION, EpisodeWriter


class SessionRecorder:
    """While ``on``, turns the stream of shown frames into dataset episodes under ``root``.

    meta: per-episode metadata (game, source, world, seed, fps, action names, keymap, ...).
    """

    def __init__(self, root: str | Path, meta: dict[str, Any], frame_shape: tuple[int, int, int]) -> None:
        self.root = Path(root)
        self.meta = meta
        self.frame_shape = tuple(frame_shape)
        self.on = False
        self.writer: EpisodeWriter | None = None
        self.episodes: list[str] = []  # directories of finished episodes

    def toggle(self, frame: np.ndarray, controller: str, meta: dict[str, Any] | None = None) -> bool:
        """Start recording at ``frame`` (what is on screen now), or stop; returns the new state."""
        if self.on:
            self.stop()
        else:
            self.on = True
            self.begin(frame, controller, meta)
        return self.on

    def begin(self, frame: np.ndarray, controller: str, meta: dict[str, Any] | None = None) -> None:
        """A new episode starts at ``frame``, with ``meta`` added to the session's metadata (its
        seed, ...); no-op while not recording."""
        if not self.on:
            return
        self._close(END_INTERRUPTED)  # the player restarted: the open episode was cut short
        self.writer = EpisodeWriter(self.root, {**self.meta, **(meta or {})}, self.frame_shape)
        self.writer.add(frame, NULL_ACTION, controller=controller)

    def add(self, frame: np.ndarray, action: int, reward: float, terminated: bool, controller: str) -> None:
        """Frame reached by ``action``; an episode the world ended is closed as terminated."""
        if self.writer is not None:
            self.writer.add(frame, action, reward=reward, terminated=terminated, controller=controller)
            if terminated:
                self._close(END_TERMINATED)

    def stop(self) -> None:
        """Stop recording; the open episode's last frame is marked truncated."""
        self._close(END_INTERRUPTED)
        self.on = False

    def _close(self, end: str) -> None:
        if self.writer is not None:
            self.writer.close(end)
            self.episodes.append(str(self.writer.dir))
            self.writer = None
