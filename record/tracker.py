"""A Breakout player that follows the ball with noise: recordings full of flights, bounces and hits.

Uniform random actions keep Breakout's ball in play only about a third of the time and rarely
break a brick, so a world trained on them sees few of the events a player cares about. This
controller moves the paddle under the ball (aiming at a random offset, so the ball leaves at
varied angles), serves when no ball is in play, and with probability ``noise`` holds a random
action for a few frames instead, so every action is still seen in every situation and the ball
is missed now and then (a world must learn losing a life too).

It reads native frames by default; given a `BreakoutScreen` it reads frames of that size instead
(a world's 64x64 frames), so the evaluation can play a world with the controller that recorded
its data and compare the two games under the same player.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from envs.breakout import PLAY_COLS, BreakoutScreen, ball_native, paddle_native
from record.controllers import Controller


class BallTracker(Controller):
    """action_names: the game's names (must contain NOOP, FIRE, RIGHT, LEFT)."""

    name = "tracker"

    def __init__(
        self,
        action_names: list[str],
        noise: float = 0.2,
        repeat: tuple[int, int] = (2, 6),
        aim: float = 6.0,
        seed: int | None = None,
        screen: BreakoutScreen | None = None,
    ) -> None:
        missing = {"NOOP", "FIRE", "RIGHT", "LEFT"} - set(action_names)
        if missing:
            raise ValueError(
                f"the tracker plays Breakout-like games with NOOP, FIRE, RIGHT and LEFT; this game's actions "
                f"{action_names} lack {sorted(missing)}"
            )
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"tracker noise must be in [0, 1], got {noise}")
        self.ids = {name: action_names.index(name) for name in ("NOOP", "FIRE", "RIGHT", "LEFT")}
        self.n_actions = len(action_names)
        self.noise, self.repeat, self.aim = noise, tuple(repeat), aim
        self.screen = screen
        self.rng = np.random.default_rng(seed)
        self._random_left = 0
        self._random_action = 0
        self._offset = 0.0
        self._no_ball = 0

    def reset(self, frame: np.ndarray, seed: int | None = None) -> None:
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self._random_left = 0
        self._no_ball = 0
        self._offset = float(self.rng.uniform(-self.aim, self.aim))

    def act(self, frame: np.ndarray) -> int:
        if self._random_left > 0:
            self._random_left -= 1
            return self._random_action
        if self.rng.random() < self.noise:
            self._random_action = int(self.rng.integers(self.n_actions))
            self._random_left = int(self.rng.integers(self.repeat[0], self.repeat[1] + 1)) - 1
            return self._random_action
        ball, paddle = self._read(frame)
        if ball is None:
            self._no_ball += 1
            # serve after a short, random wait: the world must also learn frames with no ball
            if self._no_ball > int(self.rng.integers(2, 12)):
                self._offset = float(self.rng.uniform(-self.aim, self.aim))
                return self.ids["FIRE"]
            target = (PLAY_COLS[0] + PLAY_COLS[1]) / 2
        else:
            self._no_ball = 0
            target = ball[1] + self._offset
        if paddle is None:
            return self.ids["NOOP"]
        if target > paddle + 3:
            return self.ids["RIGHT"]
        if target < paddle - 3:
            return self.ids["LEFT"]
        return self.ids["NOOP"]

    def _read(self, frame: np.ndarray) -> tuple[tuple[float, float] | None, float | None]:
        """Ball (row, column) and paddle column in native screen coordinates."""
        if self.screen is None:
            return ball_native(frame), paddle_native(frame)
        ball, paddle = self.screen.read_ball(frame).ball, self.screen.paddle(frame)
        return (None if ball is None else self.screen.to_native(*ball),
                None if paddle is None else self.screen.to_native(0.0, paddle)[1])

    def config(self) -> dict[str, Any]:
        return {"noise": self.noise, "repeat": list(self.repeat), "aim": self.aim}
