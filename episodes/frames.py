"""Frame preprocessing to the model resolution: optional crop, then area-averaged resize.

INTER_AREA averages the source pixels under each target pixel, so thin sprites (Breakout's ball,
a far Doom doorway) fade instead of flickering in and out the way nearest/linear sampling does.
"""

from __future__ import annotations

import cv2
import numpy as np

Size = tuple[int, int]  # (height, width) in pixels
Crop = tuple[int, int, int, int]  # pixels removed from (top, bottom, left, right)


def parse_size(text: str) -> Size:
    """``"64x64"`` or ``"64"`` -> ``(64, 64)``; ``"120x160"`` -> ``(120, 160)`` (height x width)."""
    parts = text.lower().replace(" ", "").split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"size {text!r} is not HxW (e.g. 64x64)") from None
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2 or min(dims) < 1:
        raise ValueError(f"size {text!r} is not HxW with positive integers (e.g. 64x64)")
    return dims[0], dims[1]


def resize_frames(frames: np.ndarray, size: Size | None, crop: Crop | None = None) -> np.ndarray:
    """Crop then resize uint8 frames.

    frames: (H, W, 3) or (N, H, W, 3) uint8.
    size:   (h, w) target, or None to keep the (cropped) size.
    returns (h, w, 3) or (N, h, w, 3) uint8; the input itself when nothing changes.
    """
    if crop is not None:
        top, bottom, left, right = crop
        frames = frames[..., top : frames.shape[-3] - bottom, left : frames.shape[-2] - right, :]
        frames = np.ascontiguousarray(frames)  # cv2 wants contiguous rows
    if size is None or tuple(frames.shape[-3:-1]) == tuple(size):
        return frames
    h, w = size
    if frames.ndim == 3:
        return cv2.resize(frames, (w, h), interpolation=cv2.INTER_AREA)
    out = np.empty((frames.shape[0], h, w, frames.shape[-1]), dtype=frames.dtype)
    for i, frame in enumerate(frames):
        out[i] = cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)
    return out
