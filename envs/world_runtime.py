"""The part of the world-model env that does not depend on Gymnasium's single/vector split.

``WorldRuntime`` loads a world checkpoint, builds one batched ``Engine`` for ``batch`` worlds,
picks reset contexts, and scores transitions with the checkpoint's reward heads. The single env
(batch 1) and the native vector env (batch B, one batched forward per step) are thin adaptors
around it, so both behave the same frame for frame.
"""

from __future__ import annotations

import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from interactive.keymaps import Keymap, default_keymap
from envs.world_context import ContextSource
from envs.worlds import resolve_checkpoint
from worldmodel.engine import Engine, EngineConfig, InvalidAction

SEED_BOUND = 2**63 - 1  # engine seeds are drawn from the env's np_random below this
DEFAULT_HORIZON = 1000  # frames per episode before truncation: imagined rollouts drift


class InvalidWorldAction(gym.error.InvalidAction, ValueError):
    """An action id outside the world's action space (also a ValueError, for plain callers)."""


class WorldResetNeeded(gym.error.ResetNeeded, RuntimeError):
    """step() (or a partial reset) before the first full reset(): the engine has no frames yet.
    Gymnasium's OrderEnforcing wrapper says the same for ``gym.make`` envs; the unwrapped env and
    the vector env have no such wrapper, so they check it here (also a RuntimeError)."""


class WorldRuntime:
    """A loaded world, its engine and its context source. See the module docstring.

    checkpoint / world: a checkpoint file, or a shipped world's name (default: the default world).
    steps:          denoising steps per frame (1, 2 or 4; None = the checkpoint's default).
    context:        "real", "noise", a dataset directory or an image file (envs/world_context.py).
    context_length: frames per reset context; None = as many as the engine's cache keeps.
    engine_overrides: other EngineConfig fields (device, dtype, compile, window, ...).
    """

    def __init__(self, checkpoint: str | Path | None = None, world: str | None = None, batch: int = 1,
                 steps: int | None = None, context: str | Path | None = "real",
                 context_length: int | None = None, **engine_overrides: Any) -> None:
        known = {f.name for f in fields(EngineConfig)} - {"steps"}
        unknown = sorted(set(engine_overrides) - known)
        if unknown:  # EngineConfig.from_dict would drop them silently
            raise TypeError(f"unknown world-model env argument(s) {unknown}; engine settings are "
                            f"{sorted(known)}")
        path = resolve_checkpoint(checkpoint, world)
        overrides = {k: v for k, v in {"steps": steps, **engine_overrides}.items() if v is not None}
        self.engine = Engine.load(path, batch=batch, **overrides)
        self.engine.warm_up()  # part of loading: the first frame a player sees is not the slow one
        self.path = path
        self.batch = batch
        w = self.engine.world
        cfg = w.dit.cfg
        if context_length is None:
            # the engine keeps train_frames - frames_per_block frames; more would be evicted at once
            context_length = max(cfg.frames_per_block, cfg.train_frames - cfg.frames_per_block)
        self.context = ContextSource(
            context,
            None if w.context_frames is None else w.context_frames.numpy(),
            None if w.context_actions is None else w.context_actions.numpy(),
            self.action_names, self.frame_shape, context_length)
        self.frames = np.zeros((batch, *self.frame_shape), np.uint8)  # current frame of each world
        self._warned_no_reward = False
        # Before the first full reset the engine holds no context: a step would dream from
        # nothing (and, with no latents to score, claim the world has no reward heads).
        self.started = False

    # ---- what the world is -------------------------------------------------------------------
    @property
    def action_names(self) -> list[str]:
        return list(self.engine.action_names)

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return tuple(self.engine.frame_shape)

    @property
    def info(self) -> dict:
        return self.engine.world.info

    @property
    def name(self) -> str:
        return str(self.info.get("name") or self.path.stem)

    @property
    def fps(self) -> float:
        """The world's native frame rate (from its info; 15, Atari with frameskip 4, if unknown)."""
        return float(self.info.get("fps") or 15.0)

    @property
    def game(self) -> str | None:
        """The game spec (envs/registry.py) the world was trained on, if it says."""
        return self.info.get("game")

    @property
    def keymap(self) -> Keymap:
        """The keymap stored with the world, else one derived from its action names."""
        data = self.info.get("keymap")
        if data:
            keymap = Keymap.from_json(data)
            if list(keymap.actions) == self.action_names:
                return keymap
        return default_keymap(self.action_names)

    @property
    def has_reward(self) -> bool:
        return self.engine.reward is not None

    # ---- running it --------------------------------------------------------------------------
    def reset(self, rng: np.random.Generator, rows: list[int] | None = None,
              clip: tuple[np.ndarray, np.ndarray | None] | None = None) -> np.ndarray:
        """Start ``rows`` (default all) over from a fresh context; their frames (len(rows), H, W, 3).

        ``clip``: frames uint8 (T, H, W, 3) (any size) and their actions (T,) or None, to start from
        instead of a sampled context. A full reset re-seeds the engine from ``rng``; a partial one
        (vector autoreset) keeps the engine's generator running, which is just as deterministic
        given the same history.
        """
        everyone = rows is None
        if not everyone and not self.started:
            raise WorldResetNeeded("cannot reset some worlds (reset_mask) before the first reset(): call "
                                   "env.reset(seed=...) without reset_mask first")
        rows = list(range(self.batch)) if everyone else list(rows)
        if clip is None:
            clip = self.context.sample(rng, len(rows))
        else:
            frames = np.asarray(clip[0], np.uint8)
            t = len(frames)
            actions = np.full(t, -1, np.int64) if clip[1] is None else np.asarray(clip[1], np.int64)
            clip = np.repeat(frames[None], len(rows), 0), np.repeat(actions[None], len(rows), 0)
        seed = int(rng.integers(SEED_BOUND)) if everyone else None
        worlds = None if everyone else rows
        if clip is None:
            out = self.engine.reset(None, seed=seed, worlds=worlds)
        else:
            frames, actions = clip
            if not everyone:  # the engine takes one context row per world; others are ignored
                full_f = np.zeros((self.batch, *frames.shape[1:]), np.uint8)
                full_a = np.full((self.batch, actions.shape[1]), -1, np.int64)
                full_f[rows], full_a[rows] = frames, actions
                frames, actions = full_f, full_a
            out = self.engine.reset(frames, actions, seed=seed, worlds=worlds)
        self.frames[rows] = out[rows]
        self.started = True
        return self.frames[rows].copy()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One batched engine step: frames (B, H, W, 3), rewards (B,) float, terminated (B,) bool."""
        if not self.started:
            raise WorldResetNeeded("cannot call env.step() before env.reset(): call env.reset(seed=...) "
                                   "first; it starts the world from its context frames")
        try:
            frames = self.engine.step(actions)
        except InvalidAction as err:
            raise InvalidWorldAction(str(err)) from None
        self.frames[:] = frames
        if self.engine.rewards is not None:
            return frames, self.engine.rewards.copy(), self.engine.terminated.copy()
        if self.engine.reward is None and not self._warned_no_reward:
            self._warned_no_reward = True
            warnings.warn(f"world {self.name!r} ({self.path}) has no reward heads: rewards are 0 and "
                          "episodes end only by truncation (horizon)", stacklevel=3)
        rewards, terminated = np.zeros(self.batch, np.float64), np.zeros(self.batch, bool)
        return frames, rewards, terminated
