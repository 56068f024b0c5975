"""Controllers: whoever chooses the actions of a recording session.

A controller sees frame i and returns the action id that leads to frame i+1, or None to end the
session (the person quit, the replay ran out). Its ``name`` is stored with every step it chose.

    keyboard  a person's held keys through a keymap, fed by whoever owns the window (play.py);
              ``human`` (record/human.py) is the same controller with a window of its own
    random    uniform random actions, each held for a configurable number of frames
    explorer  a scripted walker for first-person games (record/explorer.py)
    replay    a recorded action list, step for step
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from episodes.reader import Dataset
from episodes.writer import END_CONTROLLER, META_FILE
from interactive.keymaps import Keymap
from interactive.keys import HeldKeys

RANDOM_REPEAT = (1, 8)  # play's random policy: short taps and long holds, as people do


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


class KeyboardController(Controller):
    """A person: the held keys, through the world's keymap, every frame. It owns no window: the
    window's owner feeds ``held`` (play.py's loop, or record/human.py's controller)."""

    name = "human"

    def __init__(self, keymap: Keymap, held: HeldKeys) -> None:
        self.keymap, self.held = keymap, held

    def act(self, frame: np.ndarray) -> int:
        return self.keymap.resolve(self.held.names)


def load_actions(path: str | Path, action_names: list[str]) -> list[int]:
    """Action ids from a recorded episode (or the first episode of a dataset directory), a .npy
    array, or a .json / .txt list of ids or action names."""
    path = Path(path)
    if path.is_dir():
        episode = path if (path / META_FILE).exists() else None
        dataset = Dataset(path if episode is None else path.parent)
        dirs = [episode] if episode else dataset.episode_dirs
        if not dirs:
            raise ValueError(f"replay: {path} holds no recorded episodes")
        names = dataset.meta(dirs[0]).get("action_names")
        if names is not None and list(names) != action_names:
            raise ValueError(f"replay: {dirs[0]} was recorded with actions {names}, "
                             f"this world has {action_names}")
        pieces = dataset.read(dirs[0], frames=False)
        raw = [int(a) for piece in pieces for a in piece.actions if a >= 0]  # -1: nothing pressed yet
    elif not path.is_file():
        raise ValueError(f"replay file {path} does not exist")
    elif path.suffix == ".npy":
        raw = [int(a) for a in np.load(path).reshape(-1)]
    elif path.suffix == ".json":
        raw = json.loads(path.read_text())
    else:
        raw = path.read_text().replace(",", " ").split()
    ids = [_action_id(a, action_names, path) for a in raw]
    if not ids:
        raise ValueError(f"replay file {path} holds no actions")
    return ids


def _action_id(value: int | str, action_names: list[str], path: Path) -> int:
    text = str(value).strip()
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(action_names):
        return int(text)
    if text in action_names:
        return action_names.index(text)
    raise ValueError(f"replay file {path}: {text!r} is not an action of this world "
                     f"(ids 0..{len(action_names) - 1} or names {action_names})")


def make_controller(policy: list[str], keymap: Keymap, held: HeldKeys, seed: int | None = None) -> Controller:
    """``["human"]``, ``["random"]`` or ``["replay", FILE]`` (play.py's ``--policy``)."""
    kind, *rest = policy
    if kind == "human" and not rest:
        return KeyboardController(keymap, held)
    if kind == "random" and not rest:
        return RandomController(len(keymap), repeat=RANDOM_REPEAT, seed=seed)
    if kind == "replay" and len(rest) == 1:
        return ReplayController(load_actions(rest[0], list(keymap.actions)))
    raise ValueError(f"--policy {' '.join(policy)}: expected 'human', 'random' or 'replay FILE'")
