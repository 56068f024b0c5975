"""A pygame window that shows model frames scaled up (nearest), one or more side by side.

The display path is the fastest one measured for small frames: ``surfarray.blit_array`` into a
surface of the frame's own size, then ``transform.scale`` straight into the screen (no
intermediate scaled surface, no per-frame allocation).
"""

from __future__ import annotations

import os

import numpy as np
import pygame

TARGET_SIDE = 512  # pixels: default window height for a small model frame
VIRTUAL_DRIVERS = ("dummy", "offscreen")  # SDL drivers that draw into memory, not onto a screen


class NoDisplayError(RuntimeError):
    """There is no screen to open a window on."""


def display_available() -> bool:
    """True if a window can be shown: a real screen, or a virtual one the user asked for.

    SDL silently falls back to its ``offscreen`` driver when there is no screen; that counts as
    no display unless ``SDL_VIDEODRIVER`` names it (tests and CI ask for ``dummy`` on purpose).
    """
    wanted = os.environ.get("SDL_VIDEODRIVER", "")
    try:
        pygame.display.init()
    except pygame.error:
        return False
    return wanted in VIRTUAL_DRIVERS or pygame.display.get_driver() not in VIRTUAL_DRIVERS


def default_scale(frame_shape: tuple[int, int, int]) -> int:
    """Integer zoom that makes a frame about TARGET_SIDE pixels tall (at least 1)."""
    return max(1, TARGET_SIDE // max(frame_shape[:2]))


class FrameWindow:
    """Shows ``panels`` frames of ``frame_shape`` side by side, each zoomed ``scale`` times, and
    below them a ``strip`` pixels tall for text (play's HUD), so no text covers the game's own
    score or lives."""

    def __init__(self, frame_shape: tuple[int, int, int], scale: int | None = None, title: str = "world",
                 panels: int = 1, strip: int = 0) -> None:
        pygame.display.init()
        pygame.font.init()
        self.height, self.width = frame_shape[:2]
        self.scale = scale or default_scale(frame_shape)
        pygame.display.set_caption(title)
        self.panels, self.strip = 0, strip
        self.set_panels(panels)
        self.clock = pygame.time.Clock()

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return self.height, self.width, 3

    @property
    def panel_size(self) -> tuple[int, int]:
        return self.width * self.scale, self.height * self.scale

    def set_panels(self, panels: int) -> None:
        """Resize the window for ``panels`` frames side by side."""
        if panels == self.panels:
            return
        self.panels = panels
        pw, ph = self.panel_size
        try:
            self.screen = pygame.display.set_mode((pw * panels, ph + self.strip))
        except pygame.error as err:
            raise NoDisplayError(f"cannot open a window ({err}): run this on a machine with a display, "
                                 "or set SDL_VIDEODRIVER=dummy for a headless run") from err
        # frames are blitted into these, then scaled straight into the screen
        self.small = [pygame.Surface((self.width, self.height), 0, self.screen) for _ in range(panels)]

    def draw(self, frames: list[np.ndarray]) -> None:
        """Blit uint8 (H, W, 3) frames into their panels (not shown until ``flip``)."""
        pw, ph = self.panel_size
        for i, (frame, small) in enumerate(zip(frames, self.small)):
            pygame.surfarray.blit_array(small, frame.swapaxes(0, 1))  # surfarray is (x, y)
            pygame.transform.scale(small, (pw, ph), self.screen.subsurface((i * pw, 0, pw, ph)))

    def clear_strip(self) -> tuple[int, int]:
        """Blank the text strip; returns its top-left corner (without a strip: the frame's, where
        text then overlays the frame)."""
        pw, ph = self.panel_size
        if not self.strip:
            return 0, 0
        self.screen.fill((0, 0, 0), (0, ph, pw * self.panels, self.strip))
        return 0, ph

    def flip(self) -> None:
        pygame.display.flip()

    def show(self, frames: list[np.ndarray]) -> None:
        """Draw and flip in one call (for callers with no overlay)."""
        self.draw(frames)
        pygame.event.pump()  # keeps the window responsive for callers that read no events
        self.flip()

    def tick(self, fps: float) -> float:
        """Wait out the rest of the frame at ``fps`` (0 = no wait); returns the ms since the last tick."""
        return float(self.clock.tick(fps if fps > 0 else 0))

    def close(self) -> None:
        pygame.display.quit()
