"""One model call that writes a finished block into the KV cache AND denoises the next block.

Frame-by-frame play makes each frame with K denoising calls plus one refresh call (the clean
frame's K/V into the cache). At this model size a call costs its per-op overhead far more than
its FLOPs, so running the refresh of block t and the first denoising call of block t+1 as ONE
call (twice the queries) saves most of a call per frame.

Exact, not approximate: the two query groups see exactly the keys, at exactly the time
positions, that the two separate calls would. That takes care, because once the ring is full the
cache re-bases time positions at every call (``kv_cache.py``): the refresh block and the next
block see the same cached frames at positions one frame apart, and the sink frames (pinned at 0)
at a different distance. So every group gets its own copy of the cached keys, rotated for its own
layout, and a mask picks them:

* refresh queries (block t, sigma = 0): the cache as it is now + block t itself;
* next-block queries (block t+1, noisy): the cache as it will be after the write (the slots block
  t overwrites are masked; block t's fresh keys stand in for them) + block t+1 itself.

The softmax over masked extras is the same softmax, so the outputs equal ``refresh`` followed by
``forward_cached`` up to floating-point summation order (tests/test_fused_refresh.py).
"""

from __future__ import annotations

import torch

from worldmodel.attention import attend
from worldmodel.kv_cache import CacheLayout, KVCache


def _frame_positions(lay: CacheLayout, slots: list[list[int]]) -> torch.Tensor:
    """Time positions of the given slots per world, (n,) or (B, n) as the layout's."""
    pos = lay.slot_positions
    if pos.dim() == 1:  # all worlds at the same frame: the same slots
        return pos[torch.tensor(slots[0], dtype=torch.long)]
    return torch.stack([pos[b, torch.tensor(s, dtype=torch.long)] for b, s in enumerate(slots)])


def _valid(lay: CacheLayout, batch: int) -> torch.Tensor:
    """(B, valid_slots) bool: which read slots hold a frame."""
    if lay.key_mask is not None:
        return lay.key_mask
    return torch.ones(batch, lay.valid_slots, dtype=torch.bool)


@torch.no_grad()
def refresh_and_forward(dit, x0: torch.Tensor, actions0: torch.Tensor, x: torch.Tensor,
                        sigma: torch.Tensor, actions: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Write clean block ``x0`` (B, k, h, w, c) with ``actions0`` into ``cache`` (advancing it) and
    return the velocity for the next block ``x`` (B, k, ...) at ``sigma`` (B, k) under ``actions``.

    Equal to ``dit.refresh(x0, actions0, cache); dit.forward_cached(x, sigma, actions, cache)``.
    """
    cfg = dit.cfg
    k, p = cfg.frames_per_block, cfg.tokens_per_frame
    if x0.shape[1] != k or x.shape[1] != k:
        raise ValueError(f"fused refresh takes one block of {k} frames each, got {x0.shape[1]} and "
                         f"{x.shape[1]}")
    b, dev = x.shape[0], x.device
    lay1 = cache.layout(k)                       # what the refresh call would see
    after = cache.peek_advance(k)
    lay2 = after.layout(k)                       # what the next call would see after the write
    written = [[cache.slot_of(cache.counts[w] + j) for j in range(k)] for w in range(b)]

    # Key frames, in order: [cache for refresh | block t | cache after write | block t again | block t+1]
    n1, n2 = lay1.valid_slots, lay2.valid_slots
    q_pos = torch.cat([lay1.query_positions, lay2.query_positions], dim=-1)
    k_pos = torch.cat([lay1.slot_positions, lay1.query_positions, lay2.slot_positions,
                       _frame_positions(lay2, written), lay2.query_positions], dim=-1)
    qtables = dit.rope.tables(q_pos.to(dev), p)
    ktables = dit.rope.time_tables(k_pos.to(dev), p)

    # Frame-level mask (B, 2k, n1 + k + n2 + 2k), True = attend, then expanded to tokens.
    old2 = _valid(lay2, b).clone()
    for w, slots in enumerate(written):
        old2[w, [s for s in slots if s < n2]] = False   # overwritten (or not yet written) slots
    ones = torch.ones(b, k, k, dtype=torch.bool)
    rows_a = torch.cat([_valid(lay1, b)[:, None].expand(b, k, n1), ones,
                        torch.zeros(b, k, n2 + 2 * k, dtype=torch.bool)], dim=2)
    rows_b = torch.cat([torch.zeros(b, k, n1 + k, dtype=torch.bool), old2[:, None].expand(b, k, n2),
                        ones, ones], dim=2)
    mask = torch.cat([rows_a, rows_b], dim=1).repeat_interleave(p, 1).repeat_interleave(p, 2)
    mask = mask[:, None].to(dev)                  # (B, 1, Lq, Lk)

    tokens, cond = dit.embed(torch.cat([x0, x], 1), torch.cat([torch.zeros_like(sigma), sigma], 1),
                             torch.cat([actions0, actions], 1))
    for layer, (blk, mods) in enumerate(zip(dit.blocks, dit.modulations(cond))):
        # the keys are rotated in time below, per group layout: only their spatial rotation here
        q, _, k_new, v_new = blk.pre(tokens, mods, dit.rope, qtables, store=True)
        ka, va = k_new[:, :, :k * p], v_new[:, :, :k * p]
        ck1, cv1 = cache.read(layer, lay1)
        ck2, cv2 = cache.read(layer, lay2)
        keys = torch.cat([ck1, ka, ck2, ka, k_new[:, :, k * p:]], dim=2)
        vals = torch.cat([cv1, va, cv2, va, v_new[:, :, k * p:]], dim=2)
        o = attend(q, dit.rope.rotate_time(keys, *ktables), vals, mask, cfg.attention_backend)
        cache.write(layer, ka, va)  # after reading: the evicted slot was still needed above
        tokens = blk.post(tokens, o, mods)
    cache.advance(k)
    return dit.unembed(tokens[:, k:], cond[:, k:])
