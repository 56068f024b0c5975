"""The DiT's three layouts agree with each other where they must, and masks block the future."""

import pytest
import torch

from tests.conftest import randomize
from worldmodel.dit import DiT, DiTConfig

ATOL = 2e-5


def tiny(**kw) -> DiT:
    cfg = DiTConfig(**{**dict(width=32, depth=2, heads=2, latent_size=4, latent_channels=3,
                              num_actions=5, max_frames=32, train_frames=12), **kw})
    return randomize(DiT(cfg).eval(), seed=1)


def data(model: DiT, frames: int, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c = model.cfg
    x0 = torch.randn(batch, frames, c.latent_size, c.latent_size, c.latent_channels, generator=g)
    x = torch.randn(x0.shape, generator=g)
    sigma = torch.rand(batch, frames, generator=g)
    actions = torch.randint(-1, c.num_actions, (batch, frames), generator=g)
    return x0, x, sigma, actions


def rollout_cached(model: DiT, x0, x, sigma, actions, window: int, sink: int = 0):
    """Denoise-call each block against the cache, then refresh it with the block's clean frames."""
    k = model.cfg.frames_per_block
    cache = model.new_cache(x.shape[0], window=window, sink=sink)
    outs = []
    for s in range(0, x.shape[1], k):
        sl = slice(s, s + k)
        outs.append(model.forward_cached(x[:, sl], sigma[:, sl], actions[:, sl], cache))
        model.refresh(x0[:, sl], actions[:, sl], cache)
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("block", [1, 2, 3])
def test_cached_equals_teacher_forcing(block):
    model = tiny(frames_per_block=block)
    frames = 9 if block == 3 else 8
    x0, x, sigma, actions = data(model, frames)
    # sigma shared inside a block, as in training and sampling
    sigma = sigma[:, ::block].repeat_interleave(block, dim=1)[:, :frames]
    with torch.no_grad():
        full = model(x, sigma, actions, clean=x0)
        cached, _ = rollout_cached(model, x0, x, sigma, actions, window=frames - block)
    torch.testing.assert_close(cached, full, atol=ATOL, rtol=1e-4)


def test_teacher_forcing_blocks_future():
    model = tiny()
    x0, x, sigma, actions = data(model, 6)
    with torch.no_grad():
        base = model(x, sigma, actions, clean=x0)
        x0b, xb = x0.clone(), x.clone()
        x0b[:, 4:] += 1.0
        xb[:, 4:] += 1.0
        actions_b = actions.clone()
        actions_b[:, 4:] = (actions_b[:, 4:] + 2) % model.cfg.num_actions
        pert = model(xb, sigma, actions_b, clean=x0b)
    torch.testing.assert_close(pert[:, :4], base[:, :4], atol=ATOL, rtol=1e-4)
    assert (pert[:, 4:] - base[:, 4:]).abs().max() > 1e-3
    # the noisy frame's own clean copy must not leak into it (it would make denoising trivial)
    with torch.no_grad():
        x0c = x0.clone()
        x0c[:, 3] += 5.0
        leak = model(x, sigma, actions, clean=x0c)
    torch.testing.assert_close(leak[:, 3], base[:, 3], atol=ATOL, rtol=1e-4)
    assert (leak[:, 4] - base[:, 4]).abs().max() > 1e-3


def test_bidirectional_sees_future_and_causal_does_not():
    model = tiny()
    _, x, sigma, actions = data(model, 5)
    with torch.no_grad():
        xb = x.clone()
        xb[:, 4] += 1.0
        bi = (model(xb, sigma, actions) - model(x, sigma, actions))[:, 0].abs().max()
        ca = (model(xb, sigma, actions, causal=True) - model(x, sigma, actions, causal=True))[:, :4]
    assert bi > 1e-3
    assert ca.abs().max() < ATOL


def test_actions_condition_the_output():
    model = tiny()
    x0, x, sigma, actions = data(model, 3)
    with torch.no_grad():
        a = model(x, sigma, actions, clean=x0)
        b = model(x, sigma, (actions + 1) % model.cfg.num_actions, clean=x0)
    assert (a - b).abs().max() > 1e-3


def test_rolling_window_rebases_positions():
    """Past the window, a 1-layer model's cached output equals a fresh forward on the kept frames.

    With one layer, cached K/V do not depend on the context they were computed in, so the
    reference is exact: sink frames, then the last W frames, then the current one, at positions
    0..S+W, all computed from scratch by the teacher-forcing layout.
    """
    model = tiny(depth=1, train_frames=6)
    sink, window, total = 1, 4, 13
    x0, x, sigma, actions = data(model, total)
    with torch.no_grad():
        cached, cache = rollout_cached(model, x0, x, sigma, actions, window=window, sink=sink)
        for n in range(sink + window, total):
            keep = list(range(sink)) + list(range(n - window, n)) + [n]
            ref = model(x[:, keep], sigma[:, keep], actions[:, keep], clean=x0[:, keep])[:, -1]
            torch.testing.assert_close(cached[:, n], ref, atol=ATOL, rtol=1e-4)
    assert cache.frames == total and cache.k.shape[3] == (sink + window) * model.cfg.tokens_per_frame


def test_cache_window_must_fit_training_clips():
    model = tiny(train_frames=6)
    with pytest.raises(ValueError, match="exceeds"):
        model.new_cache(1, window=6)


def test_worlds_at_different_frames_match_their_own_rollouts():
    """Reset one world of a batch mid-rollout: each world still equals its solo rollout."""
    model = tiny()
    x0, x, sigma, actions = data(model, 7, batch=2)
    cache = model.new_cache(2, window=6, sink=1)
    with torch.no_grad():
        for i in range(3):  # both worlds play 3 frames
            model.refresh(x0[:, i:i + 1], actions[:, i:i + 1], cache)
        cache.reset([1])  # world 1 starts over; world 0 goes on
        outs = []
        for i in range(4):
            j0, j1 = 3 + i, i  # world 0 is at frame 3+i, world 1 at frame i
            xx = torch.stack([x[0, j0], x[1, j1]])[:, None]
            ss = torch.stack([sigma[0, j0], sigma[1, j1]])[:, None]
            aa = torch.stack([actions[0, j0], actions[1, j1]])[:, None]
            outs.append(model.forward_cached(xx, ss, aa, cache))
            model.refresh(torch.stack([x0[0, j0], x0[1, j1]])[:, None], aa, cache)
        solo0, _ = rollout_cached(model, x0[:1], x[:1], sigma[:1], actions[:1], window=6, sink=1)
        solo1, _ = rollout_cached(model, x0[1:], x[1:], sigma[1:], actions[1:], window=6, sink=1)
    out = torch.cat(outs, dim=1)
    torch.testing.assert_close(out[0], solo0[0, 3:7], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out[1], solo1[0, 0:4], atol=ATOL, rtol=1e-4)


def refresh_block_by_block(model: DiT, x0, actions, cache) -> None:
    k = model.cfg.frames_per_block
    for s in range(0, x0.shape[1], k):
        model.refresh(x0[:, s:s + k], actions[:, s:s + k], cache)


@pytest.mark.parametrize("block,first,frames", [(1, 0, 7), (1, 2, 4), (3, 0, 6), (1, 3, 9)])
def test_multi_block_refresh_equals_block_by_block(block, first, frames):
    """Seeding several blocks in one call writes the same K/V (and so gives the same next output)
    as refreshing them one by one: in one block-causal pass when they fit without eviction
    (the (1, 3, 9) case does not fit and must fall back to block by block)."""
    model = tiny(frames_per_block=block)
    x0, x, sigma, actions = data(model, first + frames + block)
    window = 9 - 9 % block if block > 1 else 6
    caches = [model.new_cache(2, window=window, sink=0 if block > 1 else 1) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            refresh_block_by_block(model, x0[:, :first], actions[:, :first], cache)
        refresh_block_by_block(model, x0[:, first:first + frames], actions[:, first:first + frames], caches[0])
        model.refresh(x0[:, first:first + frames], actions[:, first:first + frames], caches[1])
        a, b = caches
        assert a.counts == b.counts and a.slot_frame == b.slot_frame
        torch.testing.assert_close(b.k, a.k, atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(b.v, a.v, atol=ATOL, rtol=1e-4)
        nxt = slice(first + frames, first + frames + block)
        outs = [model.forward_cached(x[:, nxt], sigma[:, nxt], actions[:, nxt], c) for c in caches]
    torch.testing.assert_close(outs[1], outs[0], atol=ATOL, rtol=1e-4)


def test_multi_block_refresh_with_worlds_at_different_frames():
    """One world reset mid-way (per-world key masks): a 3-frame refresh equals 3 single ones."""
    model = tiny()
    x0, _, _, actions = data(model, 6)
    caches = [model.new_cache(2, window=6, sink=1) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            refresh_block_by_block(model, x0[:, :2], actions[:, :2], cache)
            cache.reset([1])
        refresh_block_by_block(model, x0[:, 2:5], actions[:, 2:5], caches[0])
        model.refresh(x0[:, 2:5], actions[:, 2:5], caches[1])
    assert caches[0].counts == caches[1].counts == [5, 3]
    torch.testing.assert_close(caches[1].k, caches[0].k, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(caches[1].v, caches[0].v, atol=ATOL, rtol=1e-4)


def test_refresh_takes_whole_blocks():
    model = tiny(frames_per_block=3)
    x0, _, _, actions = data(model, 4)
    with pytest.raises(ValueError, match="whole blocks"):
        model.refresh(x0, actions, model.new_cache(2, window=6))


def reference_rotation(x: torch.Tensor, parts: list[tuple[int, int]], angles: list[torch.Tensor]) -> torch.Tensor:
    """Half-split RoPE written out pair by pair: in part [a, b) with half n, dims (a+i, a+n+i) are
    x*cos - y*sin_i and y*cos_j + x*sin_j, with each dim's own angle from ``angles`` (L, b-a)."""
    out = x.clone()
    for (a, b), ang in zip(parts, angles):
        n = (b - a) // 2
        for i in range(n):
            xi, yi = x[..., a + i], x[..., a + n + i]
            out[..., a + i] = xi * ang[:, i].cos() - yi * ang[:, i].sin()
            out[..., a + n + i] = yi * ang[:, n + i].cos() + xi * ang[:, n + i].sin()
    return out


def test_rope_rotation_matches_the_pairwise_formula():
    from worldmodel.rope import Rope3D, _freqs

    rope = Rope3D(head_dim=32, rows=2, cols=2, extra=1, max_frames=16)
    t, h, w = rope.dims
    frames = torch.tensor([3, 7])
    x = torch.randn(2, 2, 2 * 5, 32, dtype=torch.float64)
    pos_t = frames.repeat_interleave(5).double()[:, None]
    ang_t = pos_t * _freqs(t, rope.theta)
    rows = torch.tensor([0, 1, 1, 2, 2] * 2).double()[:, None]
    cols = torch.tensor([0, 1, 2, 1, 2] * 2).double()[:, None]
    ang_r, ang_c = rows * _freqs(h, rope.theta), cols * _freqs(w, rope.theta)
    # the spatial part is one half-split over h + w dims whose angles are [row | row | col | col]
    space = torch.cat([ang_r, ang_r, ang_c, ang_c], -1)
    want = reference_rotation(x, [(0, t), (t, 32)], [torch.cat([ang_t, ang_t], -1), space])
    got = rope.rotate(x.float(), *rope.tables(frames, 5)).double()
    assert torch.allclose(got, want, atol=1e-5)
    # time only, then space only == both at once (what the cache stores, then rotates at read)
    stored = rope.rotate(x.float(), *rope.space_tables(2))
    assert torch.equal(rope.rotate_time(stored, *rope.time_tables(frames, 5)), got.float())


def test_stacked_adaln_at_inference_equals_per_block():
    dit = randomize(DiT(DiTConfig(width=32, depth=3, heads=2, latent_size=4, latent_channels=4, num_actions=4)))
    cond = torch.randn(2, 3, 32)
    per_block = dit.modulations(cond)  # grad enabled: block by block
    with torch.no_grad():
        stacked = dit.modulations(cond)
        dit.blocks[1].ada.weight.add_(1.0)  # a changed weight must rebuild the stack
        changed = dit.modulations(cond)
    for a, b in zip(per_block, stacked):
        for x, y in zip(a, b):
            assert torch.allclose(x, y, atol=1e-6)
    assert torch.allclose(changed[0][0], stacked[0][0]) and not torch.allclose(changed[1][0], stacked[1][0])
