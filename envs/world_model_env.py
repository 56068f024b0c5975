"""The world model as a Gymnasium environment: ``gymnasium.make("WorldModel-v0", checkpoint=...)``.

Each ``step`` is one frame of the engine (``Engine.step``, see docs/design.md, "Inference"): the
action id conditions the next frame, the checkpoint's reward heads score the transition.
``WorldModelVectorEnv`` (defined in envs/world_model_vector_env.py, importable from here: the
registered ``vector_entry_point``) steps B worlds in one batched forward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from interactive.keymaps import Keymap
from interactive.window import FrameWindow
from envs.world_model_vector_env import WorldModelVectorEnv
from envs.world_runtime import DEFAULT_HORIZON, InvalidWorldAction, WorldResetNeeded, WorldRuntime
from envs.worlds import default_world_path

__all__ = ["WorldModelEnv", "WorldModelVectorEnv", "InvalidWorldAction", "WorldResetNeeded",
           "default_world_path"]


class WorldModelEnv(gym.Env):
    """A learned game: frames come from a causally distilled diffusion world model.

    ## Description
    The observation is the frame the world model just made. The agent's action id becomes the
    model's conditioning token for the next frame, which is made in ``steps`` denoising steps over
    a KV cache of the frames before it.

    ## Action Space
    ``Discrete(n)``: the checkpoint's named actions (``env.unwrapped.action_names``).

    ## Observation Space
    ``Box(0, 255, (H, W, 3), uint8)`` at the model's resolution.

    ## Rewards
    The checkpoint's reward heads predict a clipped reward in {-1, 0, +1} for each transition. A
    checkpoint without heads gives 0 (with a one-time warning).

    ## Starting State
    ``reset`` seeds the cache with a clip of real frames the checkpoint carries (``context="real"``),
    a random window of a recorded dataset (``context=DIR``), one image (``context=FILE.png``), or
    nothing (``context="noise"``: the first frame is made from noise). ``reset(options={"context":
    frames, "actions": actions})`` starts from given uint8 frames (T, H, W, 3) instead.

    ## Episode End
    Terminated when the reward heads predict an episode end; truncated after ``horizon`` steps.

    ## Arguments
    ``gym.make("WorldModel-v0", checkpoint=None, world=None, steps=None, horizon=1000,
    context="real", context_length=None, render_mode=None, timing_in_info=False, **engine)``:
    ``checkpoint`` a world file (default: the shipped default world, ``default_world_path()``);
    ``world`` a shipped world's name instead; ``steps`` denoising steps per frame (1, 2 or 4);
    ``horizon`` None for no truncation; ``engine`` other EngineConfig fields (device, dtype, ...).

    Info: ``step`` (frames since reset), ``steps`` (denoising steps of this frame) and, with
    ``timing_in_info=True``, ``latency_ms`` (model time of this frame). Timing is opt-in: wall-clock
    times differ between two identical rollouts, and Gymnasium's env checker (its determinism check
    compares infos) must pass on the default env; ``env.unwrapped.runtime.engine.latency_ms`` reads the
    last frame's time without it. Observations, rewards and infos repeat exactly per seed.

    Calling ``step`` before the first ``reset`` raises ``gymnasium.error.ResetNeeded``.

    ## Seeding
    ``reset(seed=s)`` seeds ``np_random``; the context choice and the engine's noise are drawn
    from it, so the same seed and actions give the same frames.
    """

    metadata = {"render_modes": ["rgb_array", "human"], "render_fps": 15}

    def __init__(self, checkpoint: str | Path | None = None, world: str | None = None,
                 steps: int | None = None, horizon: int | None = DEFAULT_HORIZON,
                 context: str | Path | None = "real", context_length: int | None = None,
                 render_mode: str | None = None, timing_in_info: bool = False, **engine: Any) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode {render_mode!r} is not one of {self.metadata['render_modes']}")
        if horizon is not None and horizon < 1:
            raise ValueError(f"horizon must be a positive number of steps or None, got {horizon}")
        self.runtime = WorldRuntime(checkpoint, world, batch=1, steps=steps, context=context,
                                    context_length=context_length, **engine)
        self.metadata = {**self.metadata, "render_fps": self.runtime.fps}
        self.render_mode = render_mode
        self.horizon = horizon
        self.timing_in_info = timing_in_info
        self.action_space = gym.spaces.Discrete(len(self.runtime.action_names))
        self.observation_space = gym.spaces.Box(0, 255, self.runtime.frame_shape, dtype=np.uint8)
        self.elapsed = 0
        self._window: FrameWindow | None = None

    # ---- what play.py and agents may want to know -------------------------------------------
    @property
    def action_names(self) -> list[str]:
        return self.runtime.action_names

    @property
    def make_kwargs(self) -> dict[str, Any]:
        """``gym.make("WorldModel-v0", **make_kwargs)`` makes this world again (for recordings)."""
        return {"checkpoint": str(self.runtime.path), "context": self.runtime.context.spec,
                "steps": self.steps, "horizon": self.horizon}

    @property
    def world_name(self) -> str:
        return self.runtime.name

    @property
    def keymap(self) -> Keymap:
        """The keys that play this world (stored with it, or derived from its action names)."""
        return self.runtime.keymap

    @property
    def game(self) -> str | None:
        """The real game (an envs/registry.py spec) this world imitates, if it names one."""
        return self.runtime.game

    @property
    def steps(self) -> int:
        """Denoising steps per frame; settable between steps (1, 2 or 4)."""
        return self.runtime.engine.steps

    @steps.setter
    def steps(self, value: int) -> None:
        self.runtime.engine.steps = value

    def flush(self, budget_ms: float | None = None) -> bool:
        """Do the last frame's cache refresh now (call it after showing the frame, while idle).
        With ``budget_ms`` (the idle time left) it runs only if it fits; otherwise it is fused
        into the next frame's first model call. Returns whether it ran."""
        return self.runtime.engine.flush(budget_ms)

    # ---- Gymnasium API -----------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        clip = None
        if options and options.get("context") is not None:  # start from given frames
            clip = (options["context"], options.get("actions"))
        obs = self.runtime.reset(self.np_random, clip=clip)[0]
        self.elapsed = 0
        if self.render_mode == "human":
            self.render()
        return obs, self._info()

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        frames, rewards, terminated = self.runtime.step(action)  # the engine checks the action
        self.elapsed += 1
        truncated = self.horizon is not None and self.elapsed >= self.horizon
        if self.render_mode == "human":
            self.render()
        return frames[0], float(rewards[0]), bool(terminated[0]), bool(truncated), self._info()

    def render(self) -> np.ndarray | None:
        frame = self.runtime.frames[0]
        if self.render_mode == "rgb_array":
            return frame.copy()
        if self.render_mode == "human":
            if self._window is None:
                self._window = FrameWindow(self.runtime.frame_shape, title=f"world: {self.runtime.name}")
            self._window.show([frame])
            self._window.tick(self.metadata["render_fps"])
        return None

    def close(self) -> None:
        if self._window is not None:
            self._window.close()
            self._window: FrameWindow | None = None

    def _info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"step": self.elapsed, "steps": self.runtime.engine.steps}
        if self.timing_in_info:
            info["latency_ms"] = self.runtime.engine.latency_ms
        return info
