"""The real frames a world starts from: whatever the caller gives (frames, an image file), made into
what the engine's cache takes."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def prepare_context(context, actions, frame_shape: tuple[int, int, int], batch: int, slots: int,
                    block: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Context frames as uint8 (B, T, H, W, 3) at the model's ``frame_shape`` and actions (B, T),
    or (None, None). ``context``: None, frames (T, H, W, 3) shared by the ``batch`` worlds or
    (B, T, H, W, 3), or an image path; ``actions`` (T,) / (B, T) or None (unknown, -1). At most
    ``slots`` frames (the cache's) in whole blocks of ``block`` frames are kept, the newest."""
    if context is None:
        return None, None
    h, w, _ = frame_shape
    if isinstance(context, (str, Path)):
        img = cv2.imread(str(context), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError(f"cannot read image {context}: give a PNG/JPEG file path")
        context = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)[None]
    ctx = np.asarray(context)
    if ctx.dtype != np.uint8 or ctx.ndim not in (4, 5) or ctx.shape[-1] != 3:
        raise ValueError(f"context must be uint8 frames (T, H, W, 3) or (B, T, H, W, 3), got "
                         f"{ctx.dtype} {ctx.shape}")
    t = ctx.shape[-4]
    acts = np.full((batch, t), -1, np.int64) if actions is None else np.array(
        np.broadcast_to(np.asarray(actions, np.int64), (batch, t)))
    # Whole blocks only, newest kept, and no more than the cache holds: older frames would be
    # evicted while seeding (the model never saw a context longer than its training clips),
    # and a context that fits is written in one model call. Cropped before resizing and
    # before copying a shared context to every world, so dropped frames cost nothing.
    keep = min(t, slots)
    keep -= keep % block
    if keep == 0:
        raise ValueError(f"context needs at least {block} frames for this chunk-wise model")
    ctx, acts = ctx[..., t - keep:, :, :, :], acts[:, t - keep:]
    if ctx.shape[-3:-1] != (h, w):
        flat = ctx.reshape(-1, *ctx.shape[-3:])
        ctx = np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in flat]
                       ).reshape(*ctx.shape[:-3], h, w, 3)
    if ctx.ndim == 4:
        ctx = np.repeat(ctx[None], batch, axis=0)
    return np.ascontiguousarray(ctx), acts
