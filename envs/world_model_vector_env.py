"""B imagined worlds stepped together: one batched engine forward per vector step.

``gymnasium.make_vec("WorldModel-v0", num_envs=B)`` (the registered ``vector_entry_point``)
builds this class. Unlike ``SyncVectorEnv`` over B single envs, which would run B batch-1
forwards, every step is a single ``Engine(batch=B)`` call; worlds that end are started over
on their own through ``engine.reset(..., worlds=[j])`` while the others keep their caches.

Autoreset follows Gymnasium's ``NEXT_STEP`` mode (its default, the same as ``SyncVectorEnv``):
the step that ends world j returns its last frame with terminated/truncated set; the *next*
step ignores world j's action, starts it over and returns the first frame of its new episode
with reward 0 and both flags False.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from envs.world_runtime import DEFAULT_HORIZON, WorldRuntime


class WorldModelVectorEnv(gym.vector.VectorEnv):
    """``num_envs`` worlds of one checkpoint in one batched engine; see the module docstring.

    Arguments are those of ``WorldModelEnv`` (checkpoint, world, steps, horizon, context,
    context_length, render_mode, timing_in_info, engine overrides) plus ``num_envs``.

    Info (arrays of shape (num_envs,), each with Gymnasium's ``_key`` mask): ``step`` (frames
    since the world's reset) and, with ``timing_in_info=True`` (off by default: times differ
    between identical rollouts), ``latency_ms`` (model time of the whole batched step, the same
    for every world). ``step`` before the first ``reset`` raises ``gymnasium.error.ResetNeeded``.

    Seeding: ``reset(seed=s)`` seeds one generator for the batch; contexts and engine noise are
    drawn from it, so the same seed and actions give the same frames in every world.
    ``options={"reset_mask": mask}`` resets only the worlds where ``mask`` is True.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 15, "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs: int = 1, checkpoint: str | Path | None = None, world: str | None = None,
                 steps: int | None = None, horizon: int | None = DEFAULT_HORIZON,
                 context: str | Path | None = "real", context_length: int | None = None,
                 render_mode: str | None = None, timing_in_info: bool = False,
                 max_episode_steps: int | None = None, **engine: Any) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode {render_mode!r} is not one of {self.metadata['render_modes']}")
        if max_episode_steps is not None:  # what a registered max_episode_steps means here
            horizon = max_episode_steps
        if horizon is not None and horizon < 1:
            raise ValueError(f"horizon must be a positive number of steps or None, got {horizon}")
        self.runtime = WorldRuntime(checkpoint, world, batch=num_envs, steps=steps, context=context,
                                    context_length=context_length, **engine)
        self.num_envs = num_envs
        self.horizon = horizon
        self.render_mode = render_mode
        self.timing_in_info = timing_in_info
        self.metadata = {**self.metadata, "render_fps": self.runtime.fps}
        self.single_action_space = gym.spaces.Discrete(len(self.runtime.action_names))
        self.single_observation_space = gym.spaces.Box(0, 255, self.runtime.frame_shape, dtype=np.uint8)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.elapsed = np.zeros(num_envs, np.int64)
        self._autoreset = np.zeros(num_envs, bool)  # worlds that ended on the previous step

    @property
    def action_names(self) -> list[str]:
        return self.runtime.action_names

    def reset(self, *, seed: int | list[int | None] | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        if isinstance(seed, (list, tuple)):  # one generator for the batch: fold the list into it
            ints = [s for s in seed if s is not None]
            self._np_random = np.random.Generator(np.random.PCG64(np.random.SeedSequence(ints))) if ints \
                else seeding.np_random()[0]
            self._np_random_seed = -1
        elif seed is not None:
            self._np_random, self._np_random_seed = seeding.np_random(seed)
        mask = (options or {}).get("reset_mask")
        if mask is None:
            self.runtime.reset(self.np_random)
            self.elapsed[:] = 0
            self._autoreset[:] = False
        else:
            mask = np.asarray(mask)
            if mask.shape != (self.num_envs,) or mask.dtype != np.bool_ or not mask.any():
                raise ValueError(f"options['reset_mask'] must be a bool array of shape ({self.num_envs},) "
                                 f"with at least one True, got {mask.dtype} {mask.shape}")
            self._reset_rows(np.flatnonzero(mask))
        return self.runtime.frames.copy(), self._info()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        frames, rewards, terminated = self.runtime.step(actions)  # every world, one forward; the engine checks them
        self.elapsed += 1
        truncated = self.elapsed >= (self.horizon if self.horizon is not None else np.inf)
        restart = np.flatnonzero(self._autoreset)
        if restart.size:  # NEXT_STEP: worlds that ended last step start over now
            self._reset_rows(restart)
            rewards[restart], terminated[restart], truncated[restart] = 0.0, False, False
        self._autoreset = terminated | truncated
        return self.runtime.frames.copy(), rewards, terminated, truncated, self._info()

    def render(self) -> tuple[np.ndarray, ...] | None:
        if self.render_mode == "rgb_array":
            return tuple(frame.copy() for frame in self.runtime.frames)
        return None

    # ---- internals ----------------------------------------------------------------------------
    def _reset_rows(self, rows: np.ndarray) -> None:
        self.runtime.reset(self.np_random, [int(r) for r in rows])
        self.elapsed[rows] = 0
        self._autoreset[rows] = False

    def _info(self) -> dict[str, Any]:
        every = np.ones(self.num_envs, bool)
        info: dict[str, Any] = {"step": self.elapsed.copy(), "_step": every}
        if self.timing_in_info:
            info["latency_ms"] = np.full(self.num_envs, self.runtime.engine.latency_ms)
            info["_latency_ms"] = every.copy()
        return info
