"""The worlds that ship in worldmodel/worlds/: within the size budget, complete, and playable."""

import gymnasium as gym
import numpy as np
import pytest
from safetensors import safe_open
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401  (registers WorldModel-v0)
from envs.worlds import DEFAULT_WORLD, shipped_worlds, world_path
from worldmodel.checkpoint import load_world

MAX_BYTES = 25 * 2**20


def test_the_default_and_breakout_ship() -> None:
    assert DEFAULT_WORLD == "breakout" and {"doom", "breakout"} <= set(shipped_worlds())


@pytest.mark.parametrize("name", ["doom", "breakout"])
def test_shipped_world_is_complete_and_plays(name: str) -> None:
    path = world_path(name)
    assert path.stat().st_size <= MAX_BYTES
    world = load_world(path)
    with safe_open(str(path), framework="pt") as f:
        assert "sha256" in f.metadata()  # load_world checked it: shipped bytes are protected
    assert world.reward is not None and world.info["name"] == name and world.info["keymap"]
    assert world.context_frames is not None and len(world.context_frames) >= 24
    assert (world.context_actions < 0).sum() >= 2  # several real clips to start from
    env = gym.make("WorldModel-v0", world=name, steps=2, horizon=20)
    obs, _ = env.reset(seed=0)
    frames = [obs] + [env.step(a % env.action_space.n)[0] for a in range(6)]
    assert all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for f in frames)
    assert np.abs(frames[-1].astype(int) - frames[0].astype(int)).mean() < 60  # no blow-up in 6 frames


def test_default_world_passes_the_env_checker_with_default_arguments() -> None:
    check_env(gym.make("WorldModel-v0").unwrapped)
