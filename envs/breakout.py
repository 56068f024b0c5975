"""Breakout's screen: where the play field, the bricks, the paddle and the ball are.

Two readers need it. The tracking controller that records Breakout reads native 210x160 frames
and needs the ball and the paddle exactly. The evaluation's game-behaviour checks read frames of
any size (the world's 64x64 ones included) and need to tell a ball from a smear, and a brick that
is there from one that was broken. Every position is therefore kept as native pixel rows and
columns and scaled to the frame at hand.

Layout of the native screen (ALE Breakout-v5): score and grey walls above row 32; six rows of
bricks in rows 57-92 (6 pixels each, 18 bricks of 8 pixels between columns 8 and 152); the field
the ball crosses in rows 93-188, where nothing else is ever drawn; the paddle in rows 189-194.
The ball is 2x4 pixels of the paddle's colour.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

NATIVE_SHAPE = (210, 160)
BALL_RGB = (200, 72, 72)  # the ball's and the paddle's colour
FIELD_ROWS = (93, 189)    # between the lowest bricks and the paddle: only the ball is drawn here
PLAY_COLS = (8, 152)      # inside the side walls
BRICK_ROWS = (57, 93)
BRICK_GRID = (6, 18)      # rows x columns of bricks
PADDLE_ROWS = (189, 195)
BALL_AREA = 2 * 4         # native pixels


def _span(native: tuple[int, int], native_len: int, size: int) -> slice:
    """Native [start, stop) scaled to a frame axis of ``size`` pixels, rounded outwards."""
    return slice(int(np.floor(native[0] * size / native_len)), int(np.ceil(native[1] * size / native_len)))


# --- native frames (the recorder) ---------------------------------------------------------

def ball_native(frame: np.ndarray) -> tuple[float, float] | None:
    """Centre (row, column) of the ball in the field of a native frame, or None when it is not there."""
    field = frame[FIELD_ROWS[0] : FIELD_ROWS[1], PLAY_COLS[0] : PLAY_COLS[1]]
    ys, xs = np.nonzero((field == BALL_RGB).all(-1))
    if len(ys) == 0:
        return None
    return FIELD_ROWS[0] + float(ys.mean()), PLAY_COLS[0] + float(xs.mean())


def paddle_native(frame: np.ndarray) -> float | None:
    """Centre column of the paddle in a native frame, or None (between lives it can be absent)."""
    rows = frame[PADDLE_ROWS[0] : PADDLE_ROWS[1], PLAY_COLS[0] : PLAY_COLS[1]]
    xs = np.nonzero((rows == BALL_RGB).all(-1).any(0))[0]
    return PLAY_COLS[0] + float(xs.mean()) if len(xs) else None


# --- frames of any size (the evaluation) ----------------------------------------------------

@dataclass(frozen=True)
class BallReading:
    """What the field of one frame shows.

    ball:  centre (row, column) in the frame's pixels when the field holds exactly one compact
           blob of a ball's size, else None.
    blobs: number of separate bright blobs in the field (0: no ball; 2 or more: a double or
           smeared ball, or noise).
    """

    ball: tuple[float, float] | None
    blobs: int


class BreakoutScreen:
    """Reads frames of one size (H, W, 3) uint8: the ball in the field, the brick grid.

    threshold: a pixel is "lit" when its brightest channel exceeds this (the field is black; an
               area-averaged 64x64 ball keeps ~40-200 of its 200 red levels depending on where it
               falls across pixel borders, so the default keeps any ball that covers a third of a
               pixel or more, and decoder noise, a few levels, stays dark).
    """

    def __init__(self, shape: tuple[int, int], threshold: int = 40) -> None:
        h, w = shape
        self.shape = (h, w)
        self.threshold = threshold
        self.field_rows = _span(FIELD_ROWS, NATIVE_SHAPE[0], h)
        # the field's first and last row can hold a brick's or the paddle's edge after resizing
        self.field_rows = slice(self.field_rows.start + 1, self.field_rows.stop - 1)
        self.play_cols = _span(PLAY_COLS, NATIVE_SHAPE[1], w)
        self.play_cols = slice(self.play_cols.start + 1, self.play_cols.stop - 1)
        scale = (h / NATIVE_SHAPE[0]) * (w / NATIVE_SHAPE[1])
        # a ball covers BALL_AREA * scale pixels, spread over up to 2x2 more at pixel borders;
        # a blob over 4x that is a smear, not a ball
        self.max_ball_px = max(4, int(np.ceil(4 * BALL_AREA * scale + 4)))
        self._brick_row_edges = np.linspace(BRICK_ROWS[0], BRICK_ROWS[1], BRICK_GRID[0] + 1) * h / NATIVE_SHAPE[0]
        self._brick_col_edges = np.linspace(PLAY_COLS[0], PLAY_COLS[1], BRICK_GRID[1] + 1) * w / NATIVE_SHAPE[1]
        paddle = _span(PADDLE_ROWS, NATIVE_SHAPE[0], h)
        self.paddle_rows = slice(paddle.start + 1, max(paddle.stop - 1, paddle.start + 2))

    def _check(self, frame: np.ndarray) -> None:
        if frame.shape[:2] != self.shape or frame.dtype != np.uint8:
            raise ValueError(f"expected a {self.shape} uint8 frame, got {frame.shape} {frame.dtype}")

    def read_ball(self, frame: np.ndarray) -> BallReading:
        self._check(frame)
        field = frame[self.field_rows, self.play_cols]
        lit = (field.max(-1) > self.threshold).astype(np.uint8)
        count, _, stats, centroids = cv2.connectedComponentsWithStats(lit, connectivity=8)
        blobs = count - 1  # label 0 is the background
        if blobs != 1:
            return BallReading(None, blobs)
        area = int(stats[1, cv2.CC_STAT_AREA])
        if area > self.max_ball_px:
            return BallReading(None, blobs)
        x, y = centroids[1]
        return BallReading((self.field_rows.start + float(y), self.play_cols.start + float(x)), 1)

    def paddle(self, frame: np.ndarray) -> float | None:
        """Centre column of the paddle in the frame's pixels (its lit columns' mean), or None."""
        self._check(frame)
        lit = frame[self.paddle_rows, self.play_cols].max(-1) > self.threshold
        xs = np.nonzero(lit.any(0))[0]
        return self.play_cols.start + float(xs.mean()) if len(xs) else None

    def to_native(self, row: float, col: float) -> tuple[float, float]:
        """A (row, column) in this frame's pixels as native screen coordinates."""
        return row * NATIVE_SHAPE[0] / self.shape[0], col * NATIVE_SHAPE[1] / self.shape[1]

    def bricks(self, frames: np.ndarray) -> np.ndarray:
        """(..., 6, 18) bool: which bricks are there (a cell's inner pixels mostly lit), for one
        frame (H, W, 3) or a stack (..., H, W, 3)."""
        if frames.shape[-3:-1] != self.shape or frames.dtype != np.uint8:
            raise ValueError(f"expected {self.shape} uint8 frames, got {frames.shape} {frames.dtype}")
        lit = frames.max(-1) > self.threshold
        out = np.zeros(frames.shape[:-3] + BRICK_GRID, dtype=bool)
        for i in range(BRICK_GRID[0]):
            r0, r1 = self._brick_row_edges[i], self._brick_row_edges[i + 1]
            rows = slice(int(np.ceil(r0)), max(int(np.floor(r1)), int(np.ceil(r0)) + 1))
            for j in range(BRICK_GRID[1]):
                c0, c1 = self._brick_col_edges[j], self._brick_col_edges[j + 1]
                cols = slice(int(np.ceil(c0)), max(int(np.floor(c1)), int(np.ceil(c0)) + 1))
                out[..., i, j] = lit[..., rows, cols].mean((-2, -1)) > 0.5
        return out

    def field_edge(self, row: float, col: float, margin: float) -> bool:
        """Whether a point lies within ``margin`` pixels of the field's border: its top or bottom,
        where a ball may leave the field for real (into the bricks, or past the paddle), or a side
        wall, where a bouncing ball is drawn over the wall for a frame."""
        return (row < self.field_rows.start + margin or row > self.field_rows.stop - 1 - margin
                or col < self.play_cols.start + margin or col > self.play_cols.stop - 1 - margin)
