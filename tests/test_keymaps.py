"""Keymaps: held-key sets resolve to one action id, deterministically."""

import pytest

from envs.doom import NAVIGATION_ACTIONS
from interactive.keymaps import BREAKOUT, DOOM_NAVIGATION, MINIGRID, PONG, Keymap, default_keymap

NOOP, FIRE, RIGHT, LEFT = range(4)  # Breakout's ids


def test_single_keys_and_alternatives() -> None:
    assert BREAKOUT.resolve({"left"}) == LEFT
    assert BREAKOUT.resolve({"a"}) == LEFT  # WASD alternative
    assert BREAKOUT.resolve({"space"}) == FIRE
    assert DOOM_NAVIGATION.resolve({"w"}) == DOOM_NAVIGATION.resolve({"up"}) == 1


def test_most_specific_match_wins() -> None:
    ids = {name: i for i, name in enumerate(DOOM_NAVIGATION.actions)}
    assert DOOM_NAVIGATION.resolve({"up", "left"}) == ids["FORWARD_TURN_LEFT"]
    assert DOOM_NAVIGATION.resolve({"up", "right", "x"}) == ids["FORWARD_TURN_RIGHT"]
    assert PONG.resolve({"up", "space"}) == PONG.actions.index("RIGHTFIRE")


def test_ties_go_to_the_lowest_id_and_order_of_keys_does_not_matter() -> None:
    assert BREAKOUT.resolve({"left", "right"}) == RIGHT  # both one key: RIGHT (2) < LEFT (3)
    assert BREAKOUT.resolve(["right", "left"]) == BREAKOUT.resolve(["left", "right"])
    assert BREAKOUT.resolve({"LEFT"}) == LEFT  # names are case-insensitive


def test_nothing_or_unknown_keys_give_the_noop() -> None:
    assert BREAKOUT.resolve(set()) == NOOP
    assert BREAKOUT.resolve({"f12"}) == NOOP
    assert MINIGRID.actions[MINIGRID.resolve(set())] == "done"  # MiniGrid has no NOOP


def test_json_round_trip() -> None:
    for keymap in (BREAKOUT, PONG, DOOM_NAVIGATION, MINIGRID):
        again = Keymap.from_json(keymap.to_dict())
        assert again == keymap


def test_doom_keymap_matches_the_doom_action_set() -> None:
    assert list(DOOM_NAVIGATION.actions) == list(NAVIGATION_ACTIONS)


def test_default_keymap_from_ale_names() -> None:
    names = ["NOOP", "FIRE", "UP", "RIGHT", "LEFT", "DOWN", "UPRIGHT", "UPLEFTFIRE", "DOWNRIGHTFIRE"]
    km = default_keymap(names)
    assert km.noop == 0 and km.bindings[0] == ()
    assert km.resolve({"up", "right"}) == names.index("UPRIGHT")
    assert km.resolve({"up", "left", "space"}) == names.index("UPLEFTFIRE")
    assert km.resolve({"down", "right", "space"}) == names.index("DOWNRIGHTFIRE")
    combos = [c for combos in km.bindings for c in combos]
    assert len(combos) == len(set(combos))  # no two actions share a key combination


def test_default_keymap_falls_back_to_number_keys() -> None:
    km = default_keymap(["left", "right", "forward", "pickup", "dance", "dance2"])
    assert km.resolve({"left"}) == 0 and km.resolve({"up"}) == 2
    assert km.keys_of(4) == "1" and km.keys_of(5) == "2"
    # colliding names also fall back rather than shadow each other
    km = default_keymap(["UP", "FORWARD"])
    assert km.resolve({"up"}) == 0 and km.keys_of(1) == "1"


def test_bad_keymaps_are_refused() -> None:
    with pytest.raises(TypeError, match="list of key names"):
        Keymap.from_dict({"NOOP": [], "FIRE": "space"})
    with pytest.raises(ValueError, match="noop action"):
        Keymap.from_dict({"a": ["x"]}, noop="b")
