"""Rolling KV cache of clean past frames: S sink frames plus a ring of W window frames.

Static shapes: one preallocated buffer per layer, ``(B, heads, (S + W) * P, head_dim)``, written
in place, so memory stays constant however long play goes on. Frame ``f`` lives in slot ``f``
while ``f < S + W``; afterwards window frames wrap around the ring (sinks are never evicted).
Because slots fill in order, the valid slots are always a prefix of the buffer.

Positions (why keys are stored *without* their time rotation): the model only ever saw time
positions ``0 .. T-1`` in training. Once the window is full, frame positions are re-based so the
current block sits at ``S + W .. S + W + k - 1``, window frames just before it (their true
distance to the query is kept), and sinks at ``0 .. S-1``. The time rotation is therefore applied
at attention time from ``positions()``; the spatial rotation, which never changes, is stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheLayout:
    """Where the frames of one query block sit: cache slot positions and the block's positions."""

    valid_slots: int            # cache slots 0 .. valid_slots-1 hold frames
    slot_positions: torch.Tensor  # (valid_slots,) long: RoPE time position of each valid slot
    query_positions: torch.Tensor  # (k,) long: positions of the block's frames


class KVCache:
    """Per-layer K/V ring buffers for ``batch`` worlds. See the module docstring."""

    def __init__(self, depth: int, batch: int, heads: int, head_dim: int, tokens_per_frame: int,
                 window: int, sink: int = 0, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if window < 1 or sink < 0:
            raise ValueError(f"need window >= 1 and sink >= 0, got window={window}, sink={sink}")
        self.window, self.sink, self.tokens_per_frame = window, sink, tokens_per_frame
        self.slots = sink + window
        shape = (depth, batch, heads, self.slots * tokens_per_frame, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.slot_frame = [-1] * self.slots  # absolute frame index held by each slot
        self.frames = 0  # clean frames written so far

    @property
    def max_position(self) -> int:
        """Largest position a query block of one frame can get (S + W)."""
        return self.slots

    def reset(self) -> None:
        """Forget every frame (buffers are kept; stale slots are never read)."""
        self.slot_frame = [-1] * self.slots
        self.frames = 0

    def slot_of(self, frame: int) -> int:
        if frame < self.slots:
            return frame
        return self.sink + (frame - self.sink) % self.window

    def layout(self, block_frames: int) -> CacheLayout:
        """Positions for a query block of ``block_frames`` frames that starts at ``self.frames``."""
        n = self.frames
        valid = min(n, self.slots)
        shift = max(0, n - self.slots)  # re-basing: frames before the window are dropped
        slot_pos = [f if f < self.sink else f - shift for f in self.slot_frame[:valid]]
        query_pos = [n - shift + j for j in range(block_frames)]
        return CacheLayout(valid, torch.tensor(slot_pos, dtype=torch.long),
                           torch.tensor(query_pos, dtype=torch.long))

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid prefix of layer ``layer``'s K and V, (B, H, valid * P, D)."""
        n = min(self.frames, self.slots) * self.tokens_per_frame
        return self.k[layer, :, :, :n], self.v[layer, :, :, :n]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a block's clean K/V (B, H, F * P, D) at the slots of frames ``frames ..``.

        Does not advance ``frames``: call ``advance(F)`` once after all layers are written.
        """
        p = self.tokens_per_frame
        f_count = k.shape[2] // p
        for j in range(f_count):
            s = self.slot_of(self.frames + j)
            self.k[layer, :, :, s * p:(s + 1) * p] = k[:, :, j * p:(j + 1) * p]
            self.v[layer, :, :, s * p:(s + 1) * p] = v[:, :, j * p:(j + 1) * p]

    def advance(self, block_frames: int) -> None:
        for j in range(block_frames):
            self.slot_frame[self.slot_of(self.frames + j)] = self.frames + j
        self.frames += block_frames
