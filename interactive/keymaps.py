"""Keymaps: named discrete actions, each bound to sets of held keys. Pure data, no pygame.

One keymap serves the recorder's human controller, ``play.py`` and the world-model env, so a
recorded action id means the same key press everywhere. Keys are pygame key *names* (what
``pygame.key.name(event.key)`` returns: ``"left"``, ``"space"``, ``"a"``, ``"return"``), which
keeps this module free of pygame and lets a keymap travel inside an episode's JSON metadata.

Resolution of a held-key set to one action id is deterministic:
  1. every binding whose keys are all held is a candidate;
  2. the binding with the most keys wins ("up+left" beats "up" when both are held);
  3. ties go to the lowest action id;
  4. if nothing matches, the keymap's no-op action (``NOOP`` if the game has one, else the
     action the keymap names as its no-op, else action 0).
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

NOOP_NAMES = ("NOOP", "NONE", "IDLE")  # action names that mean "do nothing", compared upper-case

# Words that appear in action names, and the key each one is bound to by default_keymap.
# ALE names are concatenations of these ("UPRIGHTFIRE"); others are snake_case words.
_WORD_KEYS: dict[str, str] = {
    "UP": "up",
    "DOWN": "down",
    "LEFT": "left",
    "RIGHT": "right",
    "FIRE": "space",
    "FORWARD": "up",
    "BACKWARD": "down",
    "BACK": "down",
    "JUMP": "space",
    "SHOOT": "space",
    "ATTACK": "space",
    "USE": "e",
    "TOGGLE": "space",
    "PICKUP": "p",
    "DROP": "d",
    "DONE": "return",
}
# Greedy tokenizer order for concatenated names: longest word first so "BACKWARD" is not "BACK"+...
_WORDS_BY_LENGTH = sorted(_WORD_KEYS, key=len, reverse=True)
# Fallback keys for actions whose names carry no known word: 1..9, 0, then letters.
_FALLBACK_KEYS = list("1234567890") + [c for c in string.ascii_lowercase if c not in "wasdpe"]


@dataclass(frozen=True)
class Keymap:
    """Named discrete actions and the key combinations that select them.

    actions:  action names; the index is the action id the game receives.
    bindings: per action, a tuple of alternative key combinations (each a frozenset of
              pygame key names). An empty tuple means the action has no key (reachable only
              as the no-op).
    noop:     the action id chosen when no binding matches the held keys.
    """

    actions: tuple[str, ...]
    bindings: tuple[tuple[frozenset[str], ...], ...]
    noop: int = 0

    def __post_init__(self) -> None:
        if len(self.actions) != len(self.bindings):
            raise ValueError(f"{len(self.actions)} actions but {len(self.bindings)} binding lists")
        if not 0 <= self.noop < len(self.actions):
            raise ValueError(f"noop id {self.noop} is outside 0..{len(self.actions) - 1}")

    def __len__(self) -> int:
        return len(self.actions)

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any], noop: str | None = None) -> Keymap:
        """Build from ``{action_name: keys}`` in action-id order.

        ``keys`` is ``[]`` (no key), a list of key names held together (``["up", "left"]``), or a
        list of such lists for alternatives (``[["up"], ["w"]]``). ``noop`` names the no-op
        action; by default an action called NOOP (or NONE/IDLE), else action 0.
        """
        actions = tuple(mapping)
        bindings = tuple(_parse_combos(name, keys) for name, keys in mapping.items())
        if noop is not None:
            if noop not in actions:
                raise ValueError(f"noop action {noop!r} is not one of {list(actions)}")
            noop_id = actions.index(noop)
        else:
            noop_id = next((i for i, a in enumerate(actions) if a.upper() in NOOP_NAMES), 0)
        return cls(actions, bindings, noop_id)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, the inverse of :meth:`from_dict` (stored in episode metadata)."""
        return {
            "actions": {a: [sorted(c) for c in combos] for a, combos in zip(self.actions, self.bindings)},
            "noop": self.actions[self.noop],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Keymap:
        """Inverse of :meth:`to_dict`."""
        return cls.from_dict(data["actions"], noop=data.get("noop"))

    def resolve(self, held: Iterable[str]) -> int:
        """Action id for a set of held key names (see the module docstring for the rules)."""
        held_set = {k.lower() for k in held}
        best_id, best_size = self.noop, 0
        for action_id, combos in enumerate(self.bindings):
            for combo in combos:
                # Strictly larger wins; equal size keeps the earlier (lower) id.
                if len(combo) > best_size and combo <= held_set:
                    best_id, best_size = action_id, len(combo)
        return best_id

    def keys_of(self, action_id: int) -> str:
        """Human-readable keys for an action, e.g. ``"up+left | w+a"`` (for help text and HUDs)."""
        combos = self.bindings[action_id]
        return " | ".join("+".join(sorted(c)) for c in combos) if combos else "(none)"

    def help(self) -> str:
        """One line per action: ``NAME: keys``."""
        return "\n".join(f"{name:>20s}: {self.keys_of(i)}" for i, name in enumerate(self.actions))


def _parse_combos(name: str, keys: Any) -> tuple[frozenset[str], ...]:
    """Normalise the ``keys`` of one action to a tuple of lower-case key-name frozensets."""
    if isinstance(keys, str):
        raise TypeError(f"action {name!r}: keys must be a list of key names, got the string {keys!r}")
    keys = list(keys)
    if not keys:
        return ()
    if all(isinstance(k, str) for k in keys):
        return (frozenset(k.lower() for k in keys),)
    return tuple(frozenset(k.lower() for k in combo) for combo in keys if combo)


def _tokens(name: str) -> list[str] | None:
    """Split an action name into known words ("UPRIGHTFIRE" -> UP, RIGHT, FIRE); None if it can't."""
    words: list[str] = []
    for part in name.upper().replace("-", "_").replace(" ", "_").split("_"):
        rest = part
        while rest:
            word = next((w for w in _WORDS_BY_LENGTH if rest.startswith(w)), None)
            if word is None:
                return None
            words.append(word)
            rest = rest[len(word) :]
    return words


def default_keymap(action_names: Sequence[str]) -> Keymap:
    """A keymap derived from action names, for games with no hand-written one.

    Names made of known words (ALE's ``get_action_meanings``: NOOP, FIRE, UPLEFT, ...; MiniGrid's
    left/right/forward/...) get arrows/space/etc.; a name that can't be parsed, or whose keys
    would collide with an earlier action, gets the next free key of 1..9, 0, b, c, ...
    """
    mapping: dict[str, Any] = {}
    used: set[frozenset[str]] = set()
    fallback = iter(_FALLBACK_KEYS)
    for name in action_names:
        if name.upper() in NOOP_NAMES:
            mapping[name] = []
            continue
        words = _tokens(name)
        combo = frozenset(_WORD_KEYS[w] for w in words) if words else frozenset()
        if not combo or combo in used:
            combo = frozenset({next(fallback)})
            while combo in used:
                combo = frozenset({next(fallback)})
        used.add(combo)
        mapping[name] = sorted(combo)
    return Keymap.from_dict(mapping)


# --- Keymaps of the shipped games (envs/registry.py) ---------------------------------------
# Arrows and WASD both work; space is the button. Action order = the game's action ids.

BREAKOUT = Keymap.from_dict(
    {
        "NOOP": [],
        "FIRE": [["space"], ["up"], ["w"]],
        "RIGHT": [["right"], ["d"]],
        "LEFT": [["left"], ["a"]],
    }
)

# In ALE Pong, RIGHT moves the paddle up and LEFT moves it down, so they sit on up/down.
PONG = Keymap.from_dict(
    {
        "NOOP": [],
        "FIRE": [["space"]],
        "RIGHT": [["up"], ["w"]],
        "LEFT": [["down"], ["s"]],
        "RIGHTFIRE": [["up", "space"], ["w", "space"]],
        "LEFTFIRE": [["down", "space"], ["s", "space"]],
    }
)

# First-person navigation: arrows turn and walk, WASD walks and strafes (q/e turn).
DOOM_NAVIGATION = Keymap.from_dict(
    {
        "NOOP": [],
        "FORWARD": [["up"], ["w"]],
        "BACKWARD": [["down"], ["s"]],
        "TURN_LEFT": [["left"], ["q"]],
        "TURN_RIGHT": [["right"], ["e"]],
        "STRAFE_LEFT": [["a"]],
        "STRAFE_RIGHT": [["d"]],
        "FORWARD_TURN_LEFT": [["up", "left"], ["w", "left"], ["w", "q"]],
        "FORWARD_TURN_RIGHT": [["up", "right"], ["w", "right"], ["w", "e"]],
    }
)

# MiniGrid has no no-op; "done" does nothing in navigation tasks, so it is the idle action.
MINIGRID = Keymap.from_dict(
    {
        "left": [["left"], ["a"]],
        "right": [["right"], ["d"]],
        "forward": [["up"], ["w"]],
        "pickup": [["p"]],
        "drop": [["o"]],
        "toggle": [["space"]],
        "done": [["return"]],
    },
    noop="done",
)
