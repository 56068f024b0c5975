"""The human controller of a recording session: the keyboard controller with a window of its own,
paced at the game's frame rate. Esc or closing the window ends the session."""

from __future__ import annotations

from typing import Any

import numpy as np
import pygame

from episodes.writer import END_INTERRUPTED
from interactive.hud import Hud
from interactive.keymaps import Keymap
from interactive.keys import HeldKeys
from interactive.window import FrameWindow
from record.controllers import KeyboardController


class HumanController(KeyboardController):
    """A person plays through the keymap; the window shows each frame as it is recorded, with the
    action and frame rate in a strip below it.

    keymap: the game's keymap (the same one play.py and the world-model env use).
    fps:    frames per second to pace play at (the game's native rate).
    scale:  integer window zoom, or None for the window's default.
    """

    name = "human"
    end_reason = END_INTERRUPTED

    def __init__(self, keymap: Keymap, fps: float, scale: int | None = None, title: str = "record") -> None:
        super().__init__(keymap, HeldKeys())
        self.fps, self.scale, self.title = fps, scale, title
        self.quit = False
        self.window: FrameWindow | None = None
        self.hud: Hud | None = None
        self._last_action = keymap.noop

    def reset(self, frame: np.ndarray, seed: int | None = None) -> None:
        # The window opens here, before anything is recorded, so "no display" loses nothing.
        if self.window is None:
            self.hud = Hud()
            self.window = FrameWindow(frame.shape, self.scale, f"{self.title}: Esc to stop",
                                      strip=self.hud.height(1))

    def act(self, frame: np.ndarray) -> int | None:
        if self.window is None:
            self.reset(frame)
        window, hud = self.window, self.hud
        window.draw([frame])
        name = self.keymap.actions[self._last_action]
        hud.draw(window.screen, [f"{name}   {window.clock.get_fps():4.1f} fps"], window.clear_strip())
        window.flip()
        window.tick(self.fps)  # pace at the game's rate; keys are read after the wait
        self.handle_events(pygame.event.get())
        if self.quit:
            return None
        self._last_action = super().act(frame)
        return self._last_action

    def handle_events(self, events: list[pygame.event.Event]) -> None:
        """Update the held keys and the quit flag (Esc, window closed) from pygame events."""
        for event in events:
            if event.type == pygame.QUIT or (event.type == pygame.KEYDOWN and event.key == pygame.K_ESCAPE):
                self.quit = True
            self.held.update(event)

    def config(self) -> dict[str, Any]:
        return {"fps": self.fps}

    def close(self) -> None:
        if self.window is not None:
            self.window.close()
            self.window = None
