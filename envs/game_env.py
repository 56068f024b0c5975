"""GameEnv: any source game seen the same way, as RGB frames and named discrete actions.

Recorders, viewers and the world-model env only ever see ``GameEnv``: observations are uint8
``(H, W, 3)`` frames at the game's native size, actions are ``Discrete(n)`` ids with names and a
keymap. Where the frame comes from differs per game (the observation itself for ALE and
MiniGrid, one key of a dict observation for ViZDoom, ``env.render()`` for anything else) and is
fixed by the game spec's ``frame_source``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np

from interactive.keymaps import Keymap

if TYPE_CHECKING:
    from envs.registry import GameSpec


class GameEnv(gym.Wrapper):
    """Wraps a Gymnasium env so that ``reset``/``step`` return frames.

    frame_source: ``"obs"`` (the observation is the frame), ``"obs:KEY"`` (``obs[KEY]``) or
    ``"render"`` (``env.render()``, the env must be in ``rgb_array`` mode).
    seed: used by the first ``reset()`` that is not given a seed, and for ``action_space``.
    """

    def __init__(
        self,
        env: gym.Env,
        spec: GameSpec,
        keymap: Keymap,
        action_names: list[str],
        frame_source: str,
        seed: int | None = None,
    ) -> None:
        super().__init__(env)
        self.game_spec = spec
        self.keymap = keymap
        self.action_names = action_names
        self.frame_source = frame_source
        self._pending_seed = seed
        self.action_space = gym.spaces.Discrete(len(action_names), seed=seed)
        self.observation_space = self._frame_space()

    @property
    def fps(self) -> float:
        """Frames per second of real play (one step = one frame)."""
        return self.game_spec.fps

    def frame_of(self, obs: Any) -> np.ndarray:
        """The uint8 (H, W, 3) frame for an observation of the wrapped env."""
        if self.frame_source == "render":
            frame = self.env.render()
        elif self.frame_source.startswith("obs:"):
            frame = obs[self.frame_source[4:]]
        else:
            frame = obs
        return np.asarray(frame, dtype=np.uint8)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        if seed is None and self._pending_seed is not None:
            seed = self._pending_seed
        self._pending_seed = None
        obs, info = self.env.reset(seed=seed, options=options)
        return self.frame_of(obs), info

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        if not self.action_space.contains(action):
            raise gym.error.InvalidAction(
                f"action {action!r} is not a valid id for {self.game_spec.name} "
                f"(0..{self.action_space.n - 1}: {', '.join(self.action_names)})"
            )
        obs, reward, terminated, truncated, info = self.env.step(int(action))
        return self.frame_of(obs), float(reward), bool(terminated), bool(truncated), info

    def _frame_space(self) -> gym.spaces.Box:
        """Box space of the frames; a render-sourced game is probed once to learn the shape."""
        inner = self.env.observation_space
        if self.frame_source == "obs":
            shape = inner.shape
        elif self.frame_source.startswith("obs:"):
            shape = inner[self.frame_source[4:]].shape
        else:
            self.env.reset(seed=self._pending_seed)
            shape = np.asarray(self.env.render()).shape
        if shape is None or len(shape) != 3 or shape[-1] != 3:
            raise ValueError(f"{self.game_spec.name}: frames must be (H, W, 3), got shape {shape}")
        return gym.spaces.Box(0, 255, tuple(shape), dtype=np.uint8)
