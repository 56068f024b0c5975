"""The human controller: a pygame window, the shared keymap, and the game's own frame rate.

Held keys are tracked from KEYDOWN/KEYUP events rather than ``pygame.key.get_pressed()``: the
latter does not see events posted with ``pygame.event.post``, and tests drive this controller by
posting events under ``SDL_VIDEODRIVER=dummy``. Esc or closing the window ends the session.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from envs.keymaps import Keymap
from record.controllers import Controller
from record.writer import END_INTERRUPTED

# Let Python's SIGINT handler (flush the chunk, close the episode) run instead of SDL's own.
os.environ.setdefault("SDL_NO_SIGNAL_HANDLERS", "1")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
import pygame

WINDOW_SIDE = 640  # pixels: frames are scaled up by an integer factor to about this size
HUD_HEIGHT = 22  # pixels of status line under the frame


class NoDisplayError(RuntimeError):
    """No window can be opened (no display)."""


def window_scale(frame_shape: tuple[int, ...]) -> int:
    """Integer upscale that brings the frame's longer side near WINDOW_SIDE (at least 1)."""
    return max(1, round(WINDOW_SIDE / max(frame_shape[:2])))


def open_window(width: int, height: int, title: str) -> pygame.Surface:
    """Open the pygame window, or raise NoDisplayError with what to do about it."""
    try:
        pygame.display.init()
        pygame.font.init()
        screen = pygame.display.set_mode((width, height))
    except pygame.error as err:
        raise NoDisplayError(
            f"cannot open a window ({err}): run this on a machine with a display, or set "
            "SDL_VIDEODRIVER=dummy for a headless run"
        ) from err
    pygame.display.set_caption(title)
    return screen


def draw_frame(screen: pygame.Surface, frame: np.ndarray, text: str = "") -> None:
    """Nearest-neighbour upscale of an (H, W, 3) uint8 frame to the window, plus a status line."""
    small = pygame.Surface((frame.shape[1], frame.shape[0]), 0, screen)
    pygame.surfarray.blit_array(small, frame.swapaxes(0, 1))
    width = screen.get_width()
    height = screen.get_height() - (HUD_HEIGHT if text else 0)
    screen.fill((0, 0, 0))
    screen.blit(pygame.transform.scale(small, (width, height)), (0, 0))
    if text:
        font = pygame.font.Font(None, 20)
        screen.blit(font.render(text, True, (230, 230, 230)), (4, height + 4))
    pygame.display.flip()


class HumanController(Controller):
    """A person plays through the keymap; the window shows each frame as it is recorded.

    keymap: the game's keymap (the same one play.py and the world-model env use).
    fps:    frames per second to pace play at (the game's native rate).
    scale:  integer window upscale, or None for about WINDOW_SIDE pixels.
    """

    name = "human"
    end_reason = END_INTERRUPTED

    def __init__(self, keymap: Keymap, fps: float, scale: int | None = None, title: str = "record") -> None:
        self.keymap = keymap
        self.fps = fps
        self.scale = scale
        self.title = title
        self.held: set[str] = set()
        self.quit = False
        self._screen: pygame.Surface | None = None
        self._clock = pygame.time.Clock()
        self._last_action = keymap.noop

    def reset(self, frame: np.ndarray, seed: int | None = None) -> None:
        # The window opens here, before anything is recorded, so "no display" loses nothing.
        if self._screen is None:
            scale = self.scale or window_scale(frame.shape)
            size = (frame.shape[1] * scale, frame.shape[0] * scale + HUD_HEIGHT)
            self._screen = open_window(*size, f"{self.title}: Esc to stop")

    def act(self, frame: np.ndarray) -> int | None:
        if self._screen is None:
            self.reset(frame)
        name = self.keymap.actions[self._last_action]
        draw_frame(self._screen, frame, f"{name}   {self._clock.get_fps():4.1f} fps")
        self._clock.tick(self.fps)  # pace at the game's rate; keys are read after the wait
        self.handle_events(pygame.event.get())
        if self.quit:
            return None
        self._last_action = self.keymap.resolve(self.held)
        return self._last_action

    def handle_events(self, events: list[pygame.event.Event]) -> None:
        """Update the held-key set (and the quit flag) from pygame events."""
        for event in events:
            if event.type == pygame.QUIT:
                self.quit = True
            elif event.type == pygame.KEYDOWN:
                if event.key == pygame.K_ESCAPE:
                    self.quit = True
                self.held.add(pygame.key.name(event.key))
            elif event.type == pygame.KEYUP:
                self.held.discard(pygame.key.name(event.key))
            elif event.type == pygame.WINDOWFOCUSLOST:
                self.held.clear()  # KEYUPs sent while unfocused never arrive: don't keep keys stuck

    def config(self) -> dict[str, Any]:
        return {"fps": self.fps}

    def close(self) -> None:
        if self._screen is not None:
            pygame.display.quit()
            self._screen = None
