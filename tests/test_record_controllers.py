"""Controllers and action alignment: action[i] led to frame i, through the real game."""

from pathlib import Path

import numpy as np
import pygame
import pytest

from interactive.keymaps import BREAKOUT, DOOM_NAVIGATION
from envs.registry import make_game
from record.collect import CollectConfig, collect
from record.controllers import RandomController, ReplayController, parse_repeat
from record.explorer import ExplorerController
from record.human import HumanController
from episodes.reader import Dataset

NOOP, FIRE, RIGHT, LEFT = range(4)  # Breakout's ids


def replay_matches(episode, shift: int = 0) -> bool:
    """Step the real game with the episode's recorded actions (from its seed) and compare every
    frame and reward with the recording. ``shift`` misaligns actions on purpose."""
    env = make_game(episode.meta["game"], **episode.meta["make_kwargs"])
    frame, _ = env.reset(seed=episode.meta["seed"])
    same = np.array_equal(frame, episode.frames[0])
    for i in range(1, len(episode) - shift):
        frame, reward, *_ = env.step(int(episode.actions[i + shift]))
        same &= np.array_equal(frame, episode.frames[i]) and reward == episode.rewards[i]
    env.close()
    return bool(same)


@pytest.mark.parametrize("game", ["minigrid", "breakout"])
def test_recorded_actions_replay_to_identical_frames(tmp_path: Path, game: str) -> None:
    collect(CollectConfig(env=game, out=tmp_path, frames=120, seed=7, repeat=(1, 3), progress=False))
    episodes = list(Dataset(tmp_path).episodes())
    assert sum(len(e) for e in episodes) == 120
    for episode in episodes:
        assert episode.actions[0] == -1 and replay_matches(episode)
    assert not replay_matches(episodes[0], shift=1)  # the test can tell an off-by-one


def test_replay_controller_rerecords_an_episode(tmp_path: Path) -> None:
    collect(CollectConfig(env="breakout", out=tmp_path / "a", frames=60, seed=3, progress=False))
    (source,) = Dataset(tmp_path / "a").episodes()
    summary = collect(
        CollectConfig(env="", out=tmp_path / "b", controller="replay", replay=source.path, progress=False)
    )
    (copy,) = Dataset(tmp_path / "b").episodes()
    assert summary["frames"] == 60 and copy.meta["seed"] == source.meta["seed"]
    assert np.array_equal(copy.frames, source.frames) and np.array_equal(copy.actions, source.actions)
    assert set(copy.controller) == {"replay"} and copy.meta["replay_of"] == str(source.path)


def test_random_controller_holds_actions() -> None:
    ctrl = RandomController(4, repeat=(3, 3), seed=0)
    actions = [ctrl.act(None) for _ in range(30)]
    assert all(len(set(actions[i : i + 3])) == 1 for i in range(0, 30, 3))
    assert len(set(actions)) > 1
    assert parse_repeat("2-5") == (2, 5) and parse_repeat("4") == (4, 4)
    with pytest.raises(ValueError):
        parse_repeat("5-2")


def test_replay_controller_stops_when_it_runs_out() -> None:
    ctrl = ReplayController([2, 3])
    assert [ctrl.act(None), ctrl.act(None), ctrl.act(None)] == [2, 3, None]


def post(kind: int, key: int | None = None) -> None:
    pygame.event.post(
        pygame.event.Event(kind, key=key, mod=0) if key is not None else pygame.event.Event(kind)
    )


def test_human_controller_follows_posted_key_events() -> None:
    frame = np.zeros((210, 160, 3), np.uint8)
    ctrl = HumanController(BREAKOUT, fps=1000)
    ctrl.reset(frame)  # opens the (dummy) window
    assert ctrl.act(frame) == NOOP
    post(pygame.KEYDOWN, pygame.K_LEFT)
    assert ctrl.act(frame) == LEFT and ctrl.act(frame) == LEFT  # held keys stay held
    post(pygame.KEYDOWN, pygame.K_SPACE)
    assert ctrl.act(frame) == FIRE  # two one-key matches: the lower id wins
    post(pygame.KEYUP, pygame.K_SPACE)
    assert ctrl.act(frame) == LEFT
    post(pygame.KEYUP, pygame.K_LEFT)
    post(pygame.KEYDOWN, pygame.K_d)
    assert ctrl.act(frame) == RIGHT  # WASD alias
    post(pygame.WINDOWFOCUSLOST)
    assert ctrl.act(frame) == NOOP  # losing focus releases everything
    post(pygame.QUIT)
    assert ctrl.act(frame) is None
    ctrl.close()


def test_human_session_records_the_keys_held(tmp_path: Path) -> None:
    pygame.display.init()
    post(pygame.KEYDOWN, pygame.K_RIGHT)  # held from the start of the session
    summary = collect(
        CollectConfig(env="minigrid", out=tmp_path, controller="human", frames=5, progress=False)
    )
    (episode,) = Dataset(tmp_path).episodes()
    assert summary["frames"] == 5 and set(episode.controller) == {"human"}
    assert [episode.action_names[a] for a in episode.actions[1:]] == ["right"] * 4


def test_explorer_backs_off_and_turns_when_the_view_stops_changing() -> None:
    names = list(DOOM_NAVIGATION.actions)
    ctrl = ExplorerController(names, seed=0)
    wall = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    ctrl.reset(wall, seed=0)
    actions = [names[ctrl.act(wall)] for _ in range(300)]  # the same frame forever: always blocked
    assert ctrl.recoveries > 5
    runs, streak = [], 0
    for a in actions:  # never pushes on for more than stuck_frames blocked steps outside a recovery
        streak = streak + 1 if a in ("FORWARD", "FORWARD_TURN_LEFT", "FORWARD_TURN_RIGHT") else 0
        runs.append(streak)
    assert max(runs) <= ctrl.stuck_frames
    assert {"TURN_LEFT", "TURN_RIGHT"} & set(actions)


def test_explorer_walks_a_doom_map() -> None:
    env = make_game("doom")
    frame, info = env.reset(seed=1)
    ctrl = ExplorerController(env.action_names, seed=1)
    ctrl.reset(frame, seed=1)
    positions, actions = [info["position"]], []
    for _ in range(400):
        actions.append(ctrl.act(frame))
        frame, *_, info = env.step(actions[-1])
        positions.append(info["position"])
    env.close()
    cells = {tuple(c) for c in (np.array(positions) // 64).astype(int)}
    assert len(cells) >= 6  # it got somewhere, not spinning in place
    assert np.bincount(actions, minlength=len(env.action_names)).max() < 0.7 * len(actions)


def test_explorer_needs_a_first_person_game() -> None:
    with pytest.raises(ValueError, match="--env doom"):
        ExplorerController(["NOOP", "FIRE", "RIGHT", "LEFT"])
