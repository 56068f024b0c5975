"""The real game a world was trained on, stepped with the same actions for a side-by-side view."""

from __future__ import annotations

import numpy as np

from envs.registry import make_game


class RealGame:
    """``game`` (a spec name or Gymnasium id from envs/registry.py) at the world's frame size.

    Refuses a game whose actions differ from the world's, since the same id would mean
    different things on the two sides.
    """

    def __init__(self, game: str, action_names: list[str], frame_shape: tuple[int, int, int]) -> None:
        self.env = make_game(game)
        if list(self.env.action_names) != list(action_names):
            self.env.close()
            raise ValueError(f"real game {game!r} has actions {self.env.action_names}, the world has "
                             f"{action_names}: they cannot be driven by the same keys")
        self.size = frame_shape[:2]
        self.frame = np.zeros(frame_shape, np.uint8)

    def _model_size(self, frame: np.ndarray) -> np.ndarray:
        return self.env.game_spec.preprocess(frame, self.size)

    def reset(self, seed: int | None = None) -> np.ndarray:
        frame, _ = self.env.reset(seed=seed)
        self.frame = self._model_size(frame)
        return self.frame

    def step(self, action: int) -> np.ndarray:
        """Step; a finished game starts over on its own so the view never freezes."""
        frame, _, terminated, truncated, _ = self.env.step(action)
        if terminated or truncated:
            frame, _ = self.env.reset()
        self.frame = self._model_size(frame)
        return self.frame

    def close(self) -> None:
        self.env.close()
