"""The fused call (refresh block t + first denoise of block t+1) equals the two separate calls:
same output, same cache, through the filling phase, a full ring with re-based positions and
sinks, chunk-wise blocks and worlds at different frames."""

import pytest
import torch

from tests.test_dit import ATOL, data, tiny
from worldmodel.fused_refresh import refresh_and_forward


def play(model, x0, x, sigma, actions, window, sink, fused, worlds_reset_at=None):
    """Per block: denoise-call (fused with the previous block's refresh when ``fused``), then the
    refresh is left pending, as the engine does. Returns the outputs and the cache."""
    k = model.cfg.frames_per_block
    cache = model.new_cache(x.shape[0], window=window, sink=sink)
    outs, pending = [], None
    with torch.no_grad():
        for s in range(0, x.shape[1], k):
            if worlds_reset_at is not None and s == worlds_reset_at:
                if pending is not None:  # a reset world's pending frame is flushed first
                    model.refresh(*pending, cache)
                    pending = None
                cache.reset([1])
            sl = slice(s, s + k)
            if pending is not None and fused:
                outs.append(refresh_and_forward(model, *pending, x[:, sl], sigma[:, sl], actions[:, sl], cache))
            else:
                if pending is not None:
                    model.refresh(*pending, cache)
                outs.append(model.forward_cached(x[:, sl], sigma[:, sl], actions[:, sl], cache))
            pending = (x0[:, sl], actions[:, sl])
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("block,window,sink,frames", [(1, 6, 1, 14), (1, 4, 0, 10), (1, 3, 2, 12),
                                                      (3, 6, 0, 15), (2, 4, 2, 12)])
def test_fused_equals_refresh_then_forward(block, window, sink, frames):
    model = tiny(frames_per_block=block)
    x0, x, sigma, actions = data(model, frames)
    ref, ref_cache = play(model, x0, x, sigma, actions, window, sink, fused=False)
    out, cache = play(model, x0, x, sigma, actions, window, sink, fused=True)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-4)
    assert cache.counts == ref_cache.counts and cache.slot_frame == ref_cache.slot_frame
    torch.testing.assert_close(cache.k, ref_cache.k, atol=ATOL, rtol=1e-4)
    # and it matters: the same inputs without the refresh give a different output
    assert not torch.allclose(out[:, block:2 * block], model.forward_cached(
        x[:, block:2 * block], sigma[:, block:2 * block], actions[:, block:2 * block],
        model.new_cache(2, window=window, sink=sink)), atol=1e-3)


def test_fused_with_worlds_at_different_frames():
    """World 1 restarts at frame 5 while world 0 plays on into a full ring (per-world masks)."""
    model = tiny()
    x0, x, sigma, actions = data(model, 12)
    ref, _ = play(model, x0, x, sigma, actions, 6, 1, fused=False, worlds_reset_at=5)
    out, _ = play(model, x0, x, sigma, actions, 6, 1, fused=True, worlds_reset_at=5)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-4)


def test_fused_takes_one_block_each():
    model = tiny(frames_per_block=2)
    x0, x, sigma, actions = data(model, 4)
    cache = model.new_cache(2, window=4)
    with pytest.raises(ValueError, match="one block"):
        refresh_and_forward(model, x0, actions, x[:, :2], sigma[:, :2], actions[:, :2], cache)
