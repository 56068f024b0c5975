"""Playing a policy in the real game a world was made from, as the world showed it to the agent.

The agent learnt on the world's frames: the game's frames resized to the world's resolution
(area-averaged, as the recorder and the data loader resize them), ``frame_stack`` of them stacked.
Here the real game is shown to it the same way. Episodes are whole games (all lives), as DIAMOND
and the Atari 100k benchmark score them; ``max_steps`` truncates a game whose agent stalls (e.g.
never serves).
"""

from __future__ import annotations

from collections.abc import Callable

import gymnasium as gym
import numpy as np

from episodes.frames import resize_frames
from envs.registry import make_game


class ResizedGame(gym.ObservationWrapper):
    """A registered game whose observations are its frames at ``size`` (h, w)."""

    def __init__(self, game: str, size: tuple[int, int], make_kwargs: dict | None = None,
                 max_steps: int = 10_000) -> None:
        env = gym.wrappers.TimeLimit(make_game(game, **(make_kwargs or {})), max_episode_steps=max_steps)
        super().__init__(env)
        self.size = size
        self.observation_space = gym.spaces.Box(0, 255, (*size, 3), dtype=np.uint8)

    def observation(self, frame: np.ndarray) -> np.ndarray:
        return resize_frames(frame[None], self.size)[0]


def play(act: Callable[[np.ndarray], np.ndarray], vec, episodes: int) -> list[float]:
    """Returns of ``episodes`` finished episodes of an SB3 ``VecEnv`` (with ``VecMonitor``) played by
    ``act(obs) -> actions``; episodes still running when the count is reached are not counted."""
    returns: list[float] = []
    obs = vec.reset()
    while len(returns) < episodes:
        obs, _, dones, infos = vec.step(act(obs))
        for done, info in zip(dones, infos):
            if done and "episode" in info and len(returns) < episodes:
                returns.append(float(info["episode"]["r"]))
    return returns


def real_vec_env(game: str, size: tuple[int, int], make_kwargs: dict | None, frame_stack: int, seed: int,
                 n_envs: int = 4, max_steps: int = 10_000):
    """``n_envs`` real games, resized and frame-stacked as the agent saw its world."""
    from stable_baselines3.common.vec_env import DummyVecEnv, VecFrameStack, VecMonitor

    vec = DummyVecEnv([lambda: ResizedGame(game, size, make_kwargs, max_steps) for _ in range(n_envs)])
    vec.seed(seed)
    return VecFrameStack(VecMonitor(vec), frame_stack)


def score(model, game: str, size: tuple[int, int], make_kwargs: dict | None, frame_stack: int, episodes: int,
          seed: int, deterministic: bool = False, max_steps: int = 10_000) -> dict:
    """The agent's and a uniform random policy's returns in the real game, same seeds."""
    n = min(4, episodes)
    out = {}
    for who in ("agent", "random"):
        vec = real_vec_env(game, size, make_kwargs, frame_stack, seed, n, max_steps)
        if who == "agent":
            act = lambda obs: model.predict(obs, deterministic=deterministic)[0]  # noqa: E731
        else:
            rng = np.random.default_rng(seed)
            act = lambda obs: rng.integers(0, vec.action_space.n, len(obs))  # noqa: E731
        r = play(act, vec, episodes)
        vec.close()
        out[who] = {"mean": float(np.mean(r)), "std": float(np.std(r)), "returns": r}
    out["ratio"] = out["agent"]["mean"] / out["random"]["mean"] if out["random"]["mean"] > 0 else None
    return out
