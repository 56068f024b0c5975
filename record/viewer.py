"""The replay viewer: step through recorded episodes with each frame's action shown.

Keys: Right / Left step one frame (hold Shift for 10), Space plays/pauses at the episode's fps,
Down / Up (or PageDown / PageUp) go to the next / previous episode, Home / End jump to the
first / last frame, Esc or Q quits. The status line shows the action that led to the frame
(action[i] was pressed between frame i-1 and frame i), the reward, the flags and the controller.

It runs headless under ``SDL_VIDEODRIVER=dummy``: tests post key events and call :func:`view`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pygame

from episodes.reader import Dataset, DatasetError, Episode
from interactive.hud import Hud
from interactive.window import FrameWindow


@dataclass
class ViewerState:
    """Where the viewer is (returned by :func:`view`, so tests can check navigation)."""

    episode: int = 0
    frame: int = 0
    playing: bool = False
    steps: int = 0  # loop iterations run


def status_line(episode: Episode, index: int, position: int, count: int) -> str:
    """The text under frame ``index`` of ``episode``."""
    action = int(episode.actions[index])
    names = episode.action_names
    action_name = "(start)" if action < 0 else names[action] if action < len(names) else str(action)
    flags = "".join(
        [" TERMINATED" if episode.terminated[index] else "", " TRUNCATED" if episode.truncated[index] else ""]
    )
    return (
        f"ep {position + 1}/{count} {episode.name}  "
        f"frame {episode.start + index}/{episode.start + len(episode) - 1}  "
        f"action {action_name}  reward {episode.rewards[index]:g}  {episode.controller[index]}{flags}"
    )


def view(
    root: Path | str, episode: int = 0, scale: int | None = None, max_steps: int | None = None
) -> ViewerState:
    """Open the viewer on dataset ``root`` at episode index ``episode``; returns where it ended.

    max_steps: stop after this many loop iterations (for headless runs); None runs until quit.
    """
    dataset = Dataset(Path(root))
    dirs = dataset.episode_dirs
    if not dirs:
        raise DatasetError(f"no episodes in {root}: record some with `python -m record collect`")
    state = ViewerState(episode=min(max(0, episode), len(dirs) - 1))
    current = _load(dataset, dirs, state.episode)
    hud = Hud()
    window = FrameWindow(current.frames[0].shape, scale, f"record view: {root}", strip=hud.height(1))
    try:
        while max_steps is None or state.steps < max_steps:
            state.steps += 1
            quit_, reload = _handle(pygame.event.get(), state, len(current), len(dirs))
            if quit_:
                break
            if reload:
                current = _load(dataset, dirs, state.episode, window.frame_shape)
                state.frame = 0
            if state.playing:
                state.frame = min(state.frame + 1, len(current) - 1)
                state.playing = state.frame < len(current) - 1
            window.draw([current.frames[state.frame]])
            hud.draw(window.screen, [status_line(current, state.frame, state.episode, len(dirs))],
                     window.clear_strip())
            window.flip()
            window.tick(float(current.meta.get("fps", 30)) if state.playing else 60)
    finally:
        window.close()
    return state


def _handle(events: list, state: ViewerState, length: int, count: int) -> tuple[bool, bool]:
    """Apply key events to ``state``. Returns (quit, reload): reload when the episode changed."""
    reload = False
    for event in events:
        if event.type == pygame.QUIT:
            return True, reload
        if event.type != pygame.KEYDOWN:
            continue
        step = 10 if event.mod & pygame.KMOD_SHIFT else 1
        if event.key in (pygame.K_ESCAPE, pygame.K_q):
            return True, reload
        if event.key == pygame.K_RIGHT:
            state.frame = min(state.frame + step, length - 1)
        elif event.key == pygame.K_LEFT:
            state.frame = max(state.frame - step, 0)
        elif event.key == pygame.K_HOME:
            state.frame = 0
        elif event.key == pygame.K_END:
            state.frame = length - 1
        elif event.key == pygame.K_SPACE:
            state.playing = not state.playing
        elif event.key in (pygame.K_DOWN, pygame.K_PAGEDOWN) and state.episode < count - 1:
            state.episode, reload = state.episode + 1, True
        elif event.key in (pygame.K_UP, pygame.K_PAGEUP) and state.episode > 0:
            state.episode, reload = state.episode - 1, True
    return False, reload


def _load(dataset: Dataset, dirs: list[Path], index: int, shape: tuple[int, ...] = (64, 64, 3)) -> Episode:
    """Episode ``index`` with frames (its readable pieces joined for viewing; a blank frame of
    ``shape`` if none)."""
    pieces = dataset.read(dirs[index], frames=True)
    if not pieces:
        blank = np.zeros(shape, np.uint8)
        meta = dataset.meta(dirs[index])
        return Episode(
            dirs[index],
            meta,
            0,
            blank[None],
            np.array([-1]),
            np.zeros(1, np.float32),
            np.zeros(1, bool),
            np.zeros(1, bool),
            np.array(["(unreadable)"]),
            np.zeros(1),
        )
    return pieces[0] if len(pieces) == 1 else _concat(pieces)


def _concat(pieces: list[Episode]) -> Episode:
    first = pieces[0]
    return Episode(
        first.path,
        first.meta,
        first.start,
        np.concatenate([p.frames for p in pieces]),
        *(
            np.concatenate([getattr(p, k) for p in pieces])
            for k in ("actions", "rewards", "terminated", "truncated", "controller", "timestamps")
        ),
    )
