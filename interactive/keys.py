"""The keys a person holds down, tracked from the window's event stream.

Held keys are tracked from KEYDOWN/KEYUP events, not ``pygame.key.get_pressed()``: events are what
a window actually delivers (and what tests can post with ``pygame.event.post`` under
``SDL_VIDEODRIVER=dummy``), and the held set is cleared when the window loses focus, because the
KEYUPs sent while unfocused never arrive and a key would stay stuck down.
"""

from __future__ import annotations

import pygame


class HeldKeys:
    """The set of pygame key names held down, from the event stream; ``ignore`` keys are skipped."""

    def __init__(self, ignore: frozenset[str] = frozenset()) -> None:
        self.ignore = ignore
        self.names: set[str] = set()

    def update(self, event: pygame.event.Event) -> None:
        if event.type == pygame.KEYDOWN:
            name = pygame.key.name(event.key)
            if name not in self.ignore:
                self.names.add(name)
        elif event.type == pygame.KEYUP:
            self.names.discard(pygame.key.name(event.key))
        elif event.type == pygame.WINDOWFOCUSLOST:
            self.names.clear()
