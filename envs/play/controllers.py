"""Who chooses the action each frame in play.py: a person (held keys through the keymap), or one
of record/'s controllers (random with action repeat, replay of an action list).

Held keys are tracked from KEYDOWN/KEYUP events, not ``pygame.key.get_pressed()``: events are what
a window actually delivers (and what tests can post), and the held set is cleared when the window
loses focus so no key stays stuck down.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pygame

from envs.keymaps import Keymap
from record.controllers import Controller, RandomController, ReplayController
from record.reader import Dataset
from record.writer import META_FILE

RANDOM_REPEAT = (1, 8)  # frames each random action is held: short taps and long holds, as people do


class HeldKeys:
    """The set of pygame key names held down, from the event stream; ``ignore`` keys are skipped."""

    def __init__(self, ignore: frozenset[str] = frozenset()) -> None:
        self.ignore = ignore
        self.names: set[str] = set()

    def update(self, event: pygame.event.Event) -> None:
        if event.type == pygame.KEYDOWN:
            name = pygame.key.name(event.key)
            if name not in self.ignore:
                self.names.add(name)
        elif event.type == pygame.KEYUP:
            self.names.discard(pygame.key.name(event.key))
        elif event.type == pygame.WINDOWFOCUSLOST:
            self.names.clear()


class KeyboardController(Controller):
    """A person at play.py's window: the held keys, through the world's keymap, every frame.

    Unlike record/human.py's controller it owns no window; play.py's loop feeds ``held``.
    """

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
