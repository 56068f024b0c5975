"""A discrete first-person navigation action set over ViZDoom's Gymnasium env.

ViZDoom's ``-MultiBinary`` envs take one bit per button. Walking data for a world model wants a
small set of named, mutually exclusive actions instead (a keymap can only select one), so this
wrapper maps action ids to button vectors. It also copies the player's position from the game
variables into ``info["position"]`` so that recordings can measure how much of a map they cover.

ViZDoom has no screen once an episode has ended and returns an all-black observation for the
last step; the wrapper repeats the previous observation instead, so a recorded episode does not
end on a black frame the world model would have to learn. ViZDoom also reports a timeout as
terminated *and* truncated; here it is truncated only, as Gymnasium defines the two.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

# Button order given to ViZDoom (``available_buttons``); the vectors below index into it.
BUTTONS = ("MOVE_FORWARD", "MOVE_BACKWARD", "TURN_LEFT", "TURN_RIGHT", "MOVE_LEFT", "MOVE_RIGHT")
# Game variables requested from ViZDoom; position is map units, angle degrees.
GAME_VARIABLES = ("POSITION_X", "POSITION_Y", "ANGLE")

# Action name -> buttons held. Names match interactive.keymaps.DOOM_NAVIGATION, in the same order.
NAVIGATION_ACTIONS: dict[str, tuple[str, ...]] = {
    "NOOP": (),
    "FORWARD": ("MOVE_FORWARD",),
    "BACKWARD": ("MOVE_BACKWARD",),
    "TURN_LEFT": ("TURN_LEFT",),
    "TURN_RIGHT": ("TURN_RIGHT",),
    "STRAFE_LEFT": ("MOVE_LEFT",),
    "STRAFE_RIGHT": ("MOVE_RIGHT",),
    "FORWARD_TURN_LEFT": ("MOVE_FORWARD", "TURN_LEFT"),
    "FORWARD_TURN_RIGHT": ("MOVE_FORWARD", "TURN_RIGHT"),
}


class DoomActions(gym.Wrapper):
    """Discrete(n) named actions over a ViZDoom env with a MultiBinary button space.

    The inner env must have been made with ``available_buttons=BUTTONS`` (in that order) and,
    for ``info["position"]``, ``available_game_variables=GAME_VARIABLES``.
    """

    def __init__(self, env: gym.Env, actions: dict[str, Sequence[str]] | None = None) -> None:
        super().__init__(env)
        actions = dict(actions or NAVIGATION_ACTIONS)
        n_buttons = int(np.prod(env.action_space.shape))
        if not isinstance(env.action_space, gym.spaces.MultiBinary) or n_buttons != len(BUTTONS):
            raise ValueError(
                f"DoomActions needs a MultiBinary({len(BUTTONS)}) ViZDoom env made with "
                f"available_buttons={list(BUTTONS)}, got {env.action_space}"
            )
        self.action_names: list[str] = list(actions)
        # (n_actions, n_buttons) int8: row i is the button vector of action i.
        self._vectors = np.zeros((len(actions), len(BUTTONS)), dtype=np.int8)
        for i, buttons in enumerate(actions.values()):
            for button in buttons:
                self._vectors[i, BUTTONS.index(button)] = 1
        self.action_space = gym.spaces.Discrete(len(actions))
        # ZDoom writes its engine settings to _vizdoom.ini in the working directory unless told
        # otherwise; keep that file out of checkouts (the game starts on the first reset).
        game = getattr(env.unwrapped, "game", None)
        if game is not None and not game.is_running():
            game.set_doom_config_path(os.path.join(tempfile.gettempdir(), "_vizdoom.ini"))

    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        obs, info = self.env.reset(**kwargs)
        self._last_obs = obs
        return obs, self._with_position(obs, info)

    def step(self, action: int) -> tuple[Any, float, bool, bool, dict]:
        if not self.action_space.contains(action):
            raise gym.error.InvalidAction(f"action {action!r} is not in 0..{self.action_space.n - 1}")
        obs, reward, terminated, truncated, info = self.env.step(self._vectors[int(action)])
        if getattr(self.env.unwrapped, "state", True) is None:  # episode over: no screen
            obs = self._last_obs
        self._last_obs = obs
        terminated = bool(terminated) and not truncated  # a timeout is not a game-over
        return obs, float(reward), terminated, bool(truncated), self._with_position(obs, info)

    @staticmethod
    def _with_position(obs: Any, info: dict) -> dict:
        variables = obs.get("gamevariables") if isinstance(obs, dict) else None
        if variables is not None and len(variables) >= 2:
            info = {**info, "position": np.asarray(variables[:2], dtype=np.float32)}
        return info
