"""Controllers: whoever chooses the actions of a recording session.

A controller sees frame i and returns the action id that leads to frame i+1, or None to end the
session (the person quit, the replay ran out). Its ``name`` is stored with every step it chose.

    human     a person at the keyboard, through the shared keymap (record/human.py)
    random    uniform random actions, each held for a configurable number of frames
    explorer  a scripted walker for first-person games (record/explorer.py)
    replay    a recorded action list, step for step
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from record.writer import END_CONTROLLER


class Controller:
    """Base class: override :meth:`act` (and :meth:`reset` if the controller keeps state)."""

    name = "agent"
    end_reason = END_CONTROLLER  # recorded as the episode's end when act() returns None

    def reset(self, frame: np.ndarray, seed: int | None = None) -> None:
        """Start of an episode; ``frame`` is its first frame (H, W, 3) uint8."""

    def act(self, frame: np.ndarray) -> int | None:
        """Action id leading from ``frame`` to the next frame, or None to stop the session."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """JSON-able settings, stored in episode metadata."""
        return {}

    def close(self) -> None:
        """Release windows or other resources."""


def parse_repeat(text: str) -> tuple[int, int]:
    """``"4"`` -> (4, 4); ``"1-8"`` -> (1, 8): how many frames each random action is held."""
    lo, _, hi = text.partition("-")
    try:
        low, high = int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"repeat {text!r} is not N or LOW-HIGH (e.g. 4 or 1-8)") from None
    if not 1 <= low <= high:
        raise ValueError(f"repeat {text!r}: need 1 <= LOW <= HIGH")
    return low, high


class RandomController(Controller):
    """Uniform random actions, each held for ``repeat`` frames (a random count in [low, high]).

    Holding actions gives the longer, smoother motions a person makes, and in Atari games it
    presses FIRE often enough to keep the ball in play.
    """

    name = "random"

    def __init__(self, n_actions: int, repeat: tuple[int, int] = (4, 4), seed: int | None = None) -> None:
        self.n_actions = n_actions
        self.repeat = repeat
        self.rng = np.random.default_rng(seed)
        self._action = 0
        self._left = 0

    def reset(self, frame: np.ndarray, seed: int | None = None) -> None:
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self._left = 0

    def act(self, frame: np.ndarray) -> int:
        if self._left <= 0:
            self._action = int(self.rng.integers(self.n_actions))
            self._left = int(self.rng.integers(self.repeat[0], self.repeat[1] + 1))
        self._left -= 1
        return self._action

    def config(self) -> dict[str, Any]:
        return {"repeat": list(self.repeat)}


class ReplayController(Controller):
    """Plays back a recorded action list. With the recorded seed, the game replays the episode.

    actions: the ids to play in order (a recorded episode's ``actions[1:]``: its action[0] is
    the null action, which led to nothing).
    """

    name = "replay"

    def __init__(self, actions: Sequence[int]) -> None:
        self.actions = [int(a) for a in actions]
        self._next = 0

    def reset(self, frame: np.ndarray, seed: int | None = None) -> None:
        self._next = 0

    def act(self, frame: np.ndarray) -> int | None:
        if self._next >= len(self.actions):
            return None
        action = self.actions[self._next]
        self._next += 1
        return action

    def config(self) -> dict[str, Any]:
        return {"actions": len(self.actions)}
