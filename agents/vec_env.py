"""The batched world env as a stable-baselines3 ``VecEnv``.

SB3 has its own vector API: a world that ends is reset inside the same ``step`` call, its last
frame handed over as ``info["terminal_observation"]``. Gymnasium's ``NEXT_STEP`` autoreset, which
``WorldModelVectorEnv`` follows, resets on the call after. This adapter resets the ended worlds at
once through ``reset_mask`` (the other worlds keep their caches), so SB3's ``DummyVecEnv`` over
single envs, which would run one batch-1 forward per world, is not needed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from stable_baselines3.common.vec_env import VecEnv

from envs.world_model_vector_env import WorldModelVectorEnv


class WorldVecEnv(VecEnv):
    def __init__(self, venv: WorldModelVectorEnv) -> None:
        self.venv = venv
        super().__init__(venv.num_envs, venv.single_observation_space, venv.single_action_space)
        self._actions: np.ndarray | None = None

    def reset(self) -> np.ndarray:
        seed = next((s for s in self._seeds if s is not None), None)
        obs, _ = self.venv.reset(seed=seed)
        self._reset_seeds()
        self._reset_options()
        self.reset_infos = [{} for _ in range(self.num_envs)]
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions, dtype=np.int64).reshape(self.num_envs)

    def step_wait(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        obs, rewards, terminated, truncated, _ = self.venv.step(self._actions)
        done = terminated | truncated
        infos: list[dict[str, Any]] = [{"TimeLimit.truncated": bool(tr and not te)}
                                       for te, tr in zip(terminated, truncated)]
        if done.any():
            for j in np.flatnonzero(done):
                infos[j]["terminal_observation"] = obs[j].copy()
            fresh, _ = self.venv.reset(options={"reset_mask": done})
            obs = np.where(done[:, None, None, None], fresh, obs)
        return obs, rewards.astype(np.float32), done, infos

    def close(self) -> None:
        self.venv.close()

    # SB3 asks these of per-process envs; one batched engine has no per-world attributes
    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        return [getattr(self.venv, attr_name)] * len(self._get_indices(indices))

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        setattr(self.venv, attr_name, value)

    def env_method(self, method_name: str, *args, indices=None, **kwargs) -> list[Any]:
        return [getattr(self.venv, method_name)(*args, **kwargs)] * len(self._get_indices(indices))

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
        return [False] * len(self._get_indices(indices))

    def _get_indices(self, indices) -> list[int]:
        if indices is None:
            return list(range(self.num_envs))
        return [indices] if isinstance(indices, int) else list(indices)
