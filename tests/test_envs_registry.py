"""Game registry: specs by name or Gymnasium id, frames out, named actions in, preprocessing."""

import importlib
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import envs
from episodes.frames import parse_size, resize_frames
from envs.registry import SPECS, UnknownGameError, UnsupportedGameError, get_spec, make_game

ROOT = Path(__file__).resolve().parents[1]


def test_import_is_cheap_and_registers_the_world_model_env() -> None:
    code = (
        "import sys, envs, envs.registry, interactive.keymaps\n"
        "heavy = [m for m in ('torch', 'ale_py', 'vizdoom', 'minigrid', 'pygame') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "import gymnasium\n"
        "assert gymnasium.registry['WorldModel-v0'].entry_point == 'envs.world_model_env:WorldModelEnv'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    importlib.reload(envs)  # registering again must not fail
    assert gym.registry["WorldModel-v0"].vector_entry_point == "envs.world_model_env:WorldModelVectorEnv"


def test_names_and_gym_ids_find_the_same_spec() -> None:
    assert set(SPECS) >= {"breakout", "pong", "doom", "minigrid"}
    breakout = get_spec("breakout")
    assert get_spec("ALE/Breakout-v5") is breakout
    assert breakout.make_kwargs["repeat_action_probability"] == 0.0


def test_unknown_game_lists_the_known_names() -> None:
    with pytest.raises(UnknownGameError) as err:
        get_spec("ALE/Breakot-v5")
    message = str(err.value)
    assert "breakout" in message and "doom" in message and "ALE/Breakout-v5" in message  # a suggestion


def test_minigrid_is_exactly_64x64_and_seeded() -> None:
    env = make_game("minigrid", seed=3)
    frame, _ = env.reset()
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    assert env.observation_space.shape == (64, 64, 3)
    assert env.action_names == list(env.keymap.actions) and env.fps == 10.0
    assert np.array_equal(make_game("minigrid", seed=3).reset()[0], frame)
    assert np.array_equal(get_spec("minigrid").preprocess(frame), frame)  # already model size
    with pytest.raises(gym.error.InvalidAction, match="not a valid id"):
        env.step(7)


def test_breakout_frames_actions_and_preprocessing() -> None:
    env = make_game("ALE/Breakout-v5", seed=0)
    frame, _ = env.reset()
    assert frame.shape == (210, 160, 3) and env.fps == 15.0
    assert env.action_names == ["NOOP", "FIRE", "RIGHT", "LEFT"]
    frames = [env.step(a)[0] for a in (1, 2, 2, 3)]
    again = make_game("breakout", seed=0)
    again.reset()
    assert all(np.array_equal(f, again.step(a)[0]) for f, a in zip(frames, (1, 2, 2, 3)))  # deterministic
    small = env.game_spec.preprocess(np.stack(frames))
    assert small.shape == (4, 64, 64, 3) and small.dtype == np.uint8


def test_doom_navigation_actions_and_position() -> None:
    env = make_game("doom", seed=0)
    frame, info = env.reset()
    assert frame.shape == (240, 320, 3) and "position" in info
    assert env.action_names[:3] == ["NOOP", "FORWARD", "BACKWARD"] and env.fps == 17.5
    for _ in range(6):
        frame, *_, info = env.step(env.action_names.index("FORWARD"))
    assert frame.std() > 10  # a real view, not a blank screen
    env.close()


def test_generic_gym_ids_get_a_derived_keymap() -> None:
    pong = make_game("ALE/Pong-v5")
    assert pong.game_spec.name == "pong"
    env = make_game("MiniGrid-Empty-5x5-v0")  # a symbolic 5x5 observation: frames come from render()
    assert env.frame_source == "render" and env.reset(seed=0)[0].shape[-1] == 3
    assert env.action_names[:3] == ["left", "right", "forward"]
    assert env.keymap.resolve({"up"}) == 2
    cartpole = make_game("CartPole-v1")
    assert cartpole.action_names == ["ACTION_0", "ACTION_1"] and cartpole.reset(seed=0)[0].ndim == 3


def test_continuous_actions_are_refused() -> None:
    with pytest.raises(UnsupportedGameError, match="Discrete"):
        make_game("Pendulum-v1")


def test_resize_and_crop() -> None:
    frame = np.zeros((4, 4, 3), np.uint8)
    frame[:2, :2] = 200  # top-left quarter
    small = resize_frames(frame, (2, 2))
    assert small[0, 0, 0] == 200 and small[1, 1, 0] == 0  # INTER_AREA averages whole blocks
    assert resize_frames(np.stack([frame] * 3), (2, 2)).shape == (3, 2, 2, 3)
    assert resize_frames(frame, None, crop=(1, 1, 0, 2)).shape == (2, 2, 3)
    assert parse_size("64x48") == (64, 48) and parse_size("32") == (32, 32)
    with pytest.raises(ValueError, match="HxW"):
        parse_size("big")
