"""Rolling KV cache of clean past frames: S sink frames plus a ring of W window frames.

Static shapes: one preallocated buffer per layer, ``(B, heads, (S + W) * P, head_dim)``, written
in place, so memory stays constant however long play goes on. In each world, frame ``f`` lives
in slot ``f`` while ``f < S + W``; afterwards window frames wrap around the ring (sinks are never
evicted). Each world keeps its own frame count, so one world of a batch can be reset (vector-env
autoreset) while the others play on.

Positions (why keys are stored *without* their time rotation): the model only ever saw time
positions ``0 .. T-1`` in training. Once the window is full, frame positions are re-based so the
current block sits at ``S + W .. S + W + k - 1``, window frames just before it (their true
distance to the query is kept), and sinks at ``0 .. S-1``. The time rotation is therefore applied
at attention time from ``layout()``; the spatial rotation, which never changes, is stored.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheLayout:
    """Where the cached frames and the query block of every world sit.

    Fast path (all worlds at the same frame count): ``key_mask`` is None, the valid slots are the
    prefix ``0 .. valid_slots-1``, ``slot_positions`` is (valid_slots,) and ``query_positions``
    (k,). Otherwise every slot is read, ``key_mask`` (B, slots) says which hold a frame, and the
    positions carry a batch dim: (B, slots) and (B, k).
    """

    valid_slots: int
    slot_positions: torch.Tensor
    query_positions: torch.Tensor
    key_mask: torch.Tensor | None = None


class KVCache:
    """Per-layer K/V ring buffers for ``batch`` worlds. See the module docstring."""

    def __init__(self, depth: int, batch: int, heads: int, head_dim: int, tokens_per_frame: int,
                 window: int, sink: int = 0, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if window < 1 or sink < 0:
            raise ValueError(f"need window >= 1 and sink >= 0, got window={window}, sink={sink}")
        self.window, self.sink, self.tokens_per_frame = window, sink, tokens_per_frame
        self.batch, self.slots = batch, sink + window
        shape = (depth, batch, heads, self.slots * tokens_per_frame, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.slot_frame = [[-1] * self.slots for _ in range(batch)]  # frame index held per slot
        self.counts = [0] * batch  # clean frames written so far, per world

    @property
    def frames(self) -> int:
        """Frames written, when all worlds agree (the common case); error otherwise."""
        if len(set(self.counts)) != 1:
            raise ValueError(f"worlds are at different frames: {self.counts}")
        return self.counts[0]

    def reset(self, worlds: list[int] | None = None) -> None:
        """Forget every frame of ``worlds`` (all by default); buffers are kept, never read stale."""
        for b in range(self.batch) if worlds is None else worlds:
            self.slot_frame[b] = [-1] * self.slots
            self.counts[b] = 0

    @contextmanager
    def row(self, world: int) -> Iterator["KVCache"]:
        """A batch-1 cache sharing world ``world``'s storage, to run the model on that world alone
        (e.g. re-seeding it after an autoreset) without computing the others."""
        view = self._view()
        view.k, view.v = self.k[:, world:world + 1], self.v[:, world:world + 1]  # views, not copies
        view.batch, view.slot_frame, view.counts = 1, [self.slot_frame[world]], [self.counts[world]]
        try:
            yield view
        finally:
            self.slot_frame[world], self.counts[world] = view.slot_frame[0], view.counts[0]

    def _view(self) -> "KVCache":
        """A shallow copy sharing storage and bookkeeping; callers replace what must differ."""
        view = object.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        return view

    def peek_advance(self, block_frames: int) -> "KVCache":
        """A view whose bookkeeping is advanced by ``block_frames`` (storage shared, nothing
        written): the layout the next call will see, before the block is written."""
        view = self._view()
        view.slot_frame, view.counts = [list(r) for r in self.slot_frame], list(self.counts)
        view.advance(block_frames)
        return view

    def slot_of(self, frame: int) -> int:
        if frame < self.slots:
            return frame
        return self.sink + (frame - self.sink) % self.window

    def _positions(self, b: int, block_frames: int) -> tuple[list[int], list[int]]:
        n = self.counts[b]
        shift = max(0, n - self.slots)  # re-basing: frames before the window are dropped
        slot_pos = [f if 0 <= f < self.sink else max(f - shift, 0) for f in self.slot_frame[b]]
        return slot_pos, [n - shift + j for j in range(block_frames)]

    def layout(self, block_frames: int) -> CacheLayout:
        """Positions for a query block of ``block_frames`` frames starting at each world's count."""
        if len(set(self.counts)) == 1:
            valid = min(self.counts[0], self.slots)
            slot_pos, query_pos = self._positions(0, block_frames)
            return CacheLayout(valid, torch.tensor(slot_pos[:valid], dtype=torch.long),
                               torch.tensor(query_pos, dtype=torch.long))
        slot_pos, query_pos = zip(*(self._positions(b, block_frames) for b in range(self.batch)))
        mask = torch.tensor([[f >= 0 for f in row] for row in self.slot_frame])
        return CacheLayout(self.slots, torch.tensor(slot_pos, dtype=torch.long),
                           torch.tensor(query_pos, dtype=torch.long), mask)

    def read(self, layer: int, layout: CacheLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s K and V for ``layout``'s slots, (B, H, slots * P, D)."""
        n = layout.valid_slots * self.tokens_per_frame
        return self.k[layer, :, :, :n], self.v[layer, :, :, :n]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a block's clean K/V (B, H, F * P, D) at each world's next frame slots.

        Does not advance the counts: call ``advance(F)`` once after all layers are written.
        """
        p = self.tokens_per_frame
        for j in range(k.shape[2] // p):
            src = slice(j * p, (j + 1) * p)
            if len(set(self.counts)) == 1:
                s = self.slot_of(self.counts[0] + j)
                self.k[layer, :, :, s * p:(s + 1) * p] = k[:, :, src]
                self.v[layer, :, :, s * p:(s + 1) * p] = v[:, :, src]
                continue
            for b in range(self.batch):
                s = self.slot_of(self.counts[b] + j)
                self.k[layer, b, :, s * p:(s + 1) * p] = k[b, :, src]
                self.v[layer, b, :, s * p:(s + 1) * p] = v[b, :, src]

    def advance(self, block_frames: int) -> None:
        for b in range(self.batch):
            for j in range(block_frames):
                self.slot_frame[b][self.slot_of(self.counts[b] + j)] = self.counts[b] + j
            self.counts[b] += block_frames
