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
layout:

* refresh queries (block t, sigma = 0): the cache as it is now + block t itself;
* next-block queries (block t+1, noisy): the cache as it will be after the write (block t's fresh
  keys in the slots it overwrites) + block t+1 itself.

The two groups run as two attentions inside the one call (one per group, each over only its own
keys): one masked attention over both groups' keys computed twice the scores, which at 65 tokens
per frame made the fused call slower than the two it replaces. The outputs equal ``refresh``
followed by ``forward_cached`` up to floating-point summation order (tests/test_fused_refresh.py).
"""

from __future__ import annotations

import torch

from worldmodel.attention import attend
from worldmodel.kv_cache import CacheLayout, KVCache


def _key_mask(lay: CacheLayout, batch: int, tokens: int, block_tokens: int, device) -> torch.Tensor | None:
    """(B, 1, 1, slots * P + block) attend-mask for a group whose cache layout is ``lay``, or None
    when every read slot holds a frame (the fast path: all worlds at the same frame)."""
    if lay.key_mask is None:
        return None
    old = lay.key_mask.repeat_interleave(tokens, dim=1)
    return torch.cat([old, torch.ones(batch, block_tokens, dtype=torch.bool)], 1)[:, None, None].to(device)


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
    b, dev, kp = x.shape[0], x.device, k * p
    lay1 = cache.layout(k)                       # what the refresh call would see
    lay2 = cache.peek_advance(k).layout(k)       # what the next call would see after the write
    # the slots block t overwrites, per world: in the post-write layout they hold block t, whose
    # fresh keys stand in for what the buffer still has there
    written = [[cache.slot_of(cache.counts[w] + j) for j in range(k)] for w in range(b)]
    q_pos = torch.cat([lay1.query_positions, lay2.query_positions], dim=-1)
    qtables = dit.rope.tables(q_pos.to(dev), p)
    ktab1 = dit.rope.time_tables(torch.cat([lay1.slot_positions, lay1.query_positions], -1).to(dev), p)
    ktab2 = dit.rope.time_tables(torch.cat([lay2.slot_positions, lay2.query_positions], -1).to(dev), p)
    mask1, mask2 = _key_mask(lay1, b, p, kp, dev), _key_mask(lay2, b, p, kp, dev)

    tokens, cond = dit.embed(torch.cat([x0, x], 1), torch.cat([torch.zeros_like(sigma), sigma], 1),
                             torch.cat([actions0, actions], 1))
    for layer, (blk, mods) in enumerate(zip(dit.blocks, dit.modulations(cond))):
        # the keys are rotated in time below, per group layout: only their spatial rotation here
        q, _, k_new, v_new = blk.pre(tokens, mods, dit.rope, qtables, store=True)
        ka, va, kb, vb = k_new[:, :, :kp], v_new[:, :, :kp], k_new[:, :, kp:], v_new[:, :, kp:]
        ck1, cv1 = cache.read(layer, lay1)
        ck2, cv2 = cache.read(layer, lay2)
        ck2, cv2 = ck2.clone(), cv2.clone()
        for w, slots in enumerate(written):
            for j, s in enumerate(slots):
                ck2[w, :, s * p:(s + 1) * p] = ka[w, :, j * p:(j + 1) * p]
                cv2[w, :, s * p:(s + 1) * p] = va[w, :, j * p:(j + 1) * p]
        o_a = attend(q[:, :, :kp], dit.rope.rotate_time(torch.cat([ck1, ka], 2), *ktab1),
                     torch.cat([cv1, va], 2), mask1, cfg.attention_backend)
        o_b = attend(q[:, :, kp:], dit.rope.rotate_time(torch.cat([ck2, kb], 2), *ktab2),
                     torch.cat([cv2, vb], 2), mask2, cfg.attention_backend)
        cache.write(layer, ka, va)  # after reading: the evicted slot was still needed above
        tokens = blk.post(tokens, torch.cat([o_a, o_b], 2), mods)
    cache.advance(k)
    return dit.unembed(tokens[:, k:], cond[:, k:])
