"""The engine's cached few-step rollout is the model's teacher-forcing forward, frame by frame."""

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_world
from worldmodel import diffusion
from worldmodel.engine import Engine, EngineConfig


def engine(world, batch=1, **kw) -> Engine:
    return Engine(world, EngineConfig(**{**dict(steps=1, sink=1, dtype="float32", seed=0), **kw}),
                  batch=batch)


@pytest.mark.parametrize("batch", [1, 3])
def test_one_step_rollout_equals_teacher_forcing(batch):
    """steps=1: x0_i = eps_i - v(eps_i, 1 | clean generated past). The teacher-forcing forward
    over [generated x0 | noise] must give the same x0 for every frame."""
    world = make_tiny_world()
    eng = engine(world, batch=batch)
    # 2 context + 5 generated frames = sink + window: no eviction, so the full forward is exact
    ctx = world.context_frames.numpy()[:2]
    eng.reset(ctx, world.context_actions.numpy()[:2], seed=123)
    g = torch.Generator().manual_seed(123)
    actions = np.random.default_rng(0).integers(0, 4, size=(5, batch))
    latents, noises = [], []
    for a in actions:
        eng.step(a)
        latents.append(eng.latents.clone())
    c = eng.dit.cfg
    for _ in actions:
        noises.append(torch.randn((batch, 1, c.latent_size, c.latent_size, c.latent_channels), generator=g))
    ctx_lat = eng.tokenizer.encode(torch.from_numpy(ctx))  # (T, h, w, c)
    clean = torch.cat([ctx_lat[None].expand(batch, *ctx_lat.shape), torch.stack(latents, 1)], 1)
    noisy = torch.cat([torch.zeros_like(ctx_lat[None].expand(batch, *ctx_lat.shape)), torch.cat(noises, 1)], 1)
    acts = torch.cat([world.context_actions[None, :2].expand(batch, -1), torch.from_numpy(actions.T)], 1)
    sigma = torch.ones(acts.shape)
    with torch.no_grad():
        v = eng.dit(noisy, sigma, acts, clean=clean)
    x0 = diffusion.x0_from_velocity(noisy, v, sigma)[:, len(ctx):]
    torch.testing.assert_close(torch.stack(latents, 1), x0, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_step_count_sets_model_calls(steps):
    world = make_tiny_world()
    eng = engine(world, steps=steps)
    eng.reset(world.context_frames.numpy())
    calls = []
    hook = eng.dit.patch_in.register_forward_hook(lambda *a: calls.append(1))
    eng.step(0)   # steps denoise calls (+ the context's last refresh was already done)
    n_denoise = len(calls)
    eng.flush()   # the frame's clean-cache refresh
    hook.remove()
    assert n_denoise == steps and len(calls) == steps + 1
    assert eng.timing["steps"] == steps
    calls.clear()
    hook = eng.dit.patch_in.register_forward_hook(lambda *a: calls.append(1))
    eng.step(1)   # no flush before: the pending refresh rides along the first call
    eng.step(2)
    hook.remove()
    assert len(calls) == 2 * steps and eng.timing["fused"]


def test_flush_with_a_budget_runs_only_what_fits():
    world = make_tiny_world()
    eng = engine(world, steps=2)
    eng.reset(world.context_frames.numpy())
    eng.step(0)
    assert eng.flush() and eng.refresh_cost_ms > 0   # measured
    eng.step(1)
    assert not eng.flush(budget_ms=0.0) and eng._pending is not None  # left to the fused call
    assert eng.flush(budget_ms=1e6) and eng._pending is None
    assert not eng.flush()  # nothing pending


@pytest.mark.parametrize("block,sampler,cfg_scale", [(1, "few_step", 1.0), (1, "euler", 2.0),
                                                     (2, "few_step", 1.0)])
def test_fused_refresh_makes_the_same_frames(block, sampler, cfg_scale):
    """Fused (the refresh rides along the next frame's first call) or not, a long batched rollout
    with a per-world reset gives the same latents (past the ring's capacity, with and without CFG)."""
    world = make_tiny_world(frames_per_block=block)
    runs = []
    for fuse in (False, True):
        eng = engine(world, batch=2, steps=2, sampler=sampler, cfg_scale=cfg_scale, fuse_refresh=fuse)
        eng.reset(world.context_frames.numpy())
        lat = []
        for i in range(14):
            eng.step([i % 4, (i + 1) % 4])
            lat.append(eng.latents.clone())
            if block == 1 and i == 6:
                eng.reset(world.context_frames.numpy()[:3], worlds=[1])
                lat.append(eng.latents.clone())
        runs.append(torch.stack(lat))
    torch.testing.assert_close(runs[1], runs[0], atol=1e-4, rtol=1e-4)


def test_first_frame_from_noise_uses_first_frame_list():
    world = make_tiny_world()
    eng = engine(world, steps=1, first_frame_steps=4)
    frame = eng.reset(None)
    assert frame.shape == (1, 32, 32, 3) and frame.dtype == np.uint8
    assert eng.timing["steps"] == 4
    eng.step(1)
    assert eng.timing["steps"] == 1


def test_steps_switch_live_and_invalid_values():
    eng = engine(make_tiny_world(), steps=2)
    eng.reset(None)
    eng.steps = 4
    eng.step(0)
    assert eng.timing["steps"] == 4
    with pytest.raises(ValueError, match="steps"):
        eng.steps = 3


def test_invalid_action_message_names_the_actions():
    eng = engine(make_tiny_world())
    eng.reset(None)
    with pytest.raises(ValueError, match=r"invalid action 9.*a0"):
        eng.step(9)
    with pytest.raises(ValueError, match="one per world"):
        eng.step([0, 1])
    with pytest.raises(ValueError, match=r"integer ids 0\.\.3"):
        eng.step(1.5)  # not silently truncated to 1


@pytest.mark.parametrize("block", [1, 2])
def test_step_scores_each_transition_with_the_reward_heads(block):
    world = make_tiny_world(frames_per_block=block)
    eng = engine(world, batch=3)
    eng.reset(None)
    assert eng.rewards is None  # nothing scored before the first step
    for actions in ([0, 1, 2], [3, 3, 0], [1, 0, 2]):
        prev = eng.latents.clone()
        eng.step(actions)
        want_r, want_t = world.reward.predict(prev, eng.latents, torch.tensor(actions))
        np.testing.assert_array_equal(eng.rewards, want_r.numpy())
        np.testing.assert_array_equal(eng.terminated, want_t.numpy())
        assert eng.rewards.shape == (3,) and eng.terminated.dtype == bool


def test_seeded_rollouts_repeat_and_differ_by_seed():
    world = make_tiny_world()
    runs = []
    for seed in (5, 5, 6):
        eng = engine(world, steps=2)
        frames = [eng.reset(None, seed=seed)] + [eng.step(a) for a in (0, 1, 2, 3)]
        runs.append(np.stack(frames))
    assert np.array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_long_rollout_constant_memory_and_finite():
    world = make_tiny_world()
    eng = engine(world, steps=1)
    eng.reset(None)
    ptr = eng.cache.k.data_ptr()
    for i in range(40):  # far past window + sink
        f = eng.step(i % 4)
    eng.flush()
    assert eng.cache.k.data_ptr() == ptr and eng.cache.counts == [40 + 1]
    assert np.isfinite(eng.latents.numpy()).all()
    assert f.shape == (1, 32, 32, 3)


def test_reset_one_world_keeps_the_others():
    world = make_tiny_world()
    eng = engine(world, batch=2, steps=1)
    eng.reset(world.context_frames.numpy())
    for a in range(3):
        eng.step(a)
    eng.flush()
    eng.reset(world.context_frames.numpy()[:2], worlds=[1])
    assert eng.cache.counts == [len(world.context_frames) + 3, 2]
    out = eng.step([0, 1])
    assert out.shape == (2, 32, 32, 3)


def test_chunkwise_engine_buffers_a_block():
    world = make_tiny_world(frames_per_block=2)
    eng = engine(world, steps=2)
    eng.reset(world.context_frames.numpy())
    calls = []
    hook = eng.dit.patch_in.register_forward_hook(lambda *a: calls.append(1))
    eng.step(0)
    first = len(calls)
    eng.step(1)  # second frame of the block: no model call
    hook.remove()
    assert first == 2 and len(calls) == 2


def test_image_file_context(tmp_path):
    import cv2
    world = make_tiny_world()
    img = np.zeros((50, 70, 3), np.uint8)
    img[10:20, 10:20] = 255
    path = tmp_path / "start.png"
    cv2.imwrite(str(path), img)
    eng = engine(world)
    frame = eng.reset(str(path))
    assert frame.shape == (1, 32, 32, 3) and frame.max() == 255
    with pytest.raises(ValueError, match="cannot read image"):
        eng.reset(str(tmp_path / "missing.png"))


def test_per_world_reset_runs_the_model_on_that_world_only():
    world = make_tiny_world()
    eng = engine(world, batch=3, steps=1)
    eng.reset(world.context_frames.numpy())
    for a in range(2):
        eng.step(a)
    eng.flush()
    keep = eng.cache.k[:, [0, 2]].clone()
    seen = []
    hook = eng.dit.patch_in.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    frames = eng.reset(None, worlds=[1])
    hook.remove()
    assert seen and all(b == 1 for b in seen)  # batch-1 forwards only
    assert torch.equal(eng.cache.k[:, [0, 2]], keep)  # the other worlds' caches are untouched
    assert eng.cache.counts == [len(world.context_frames) + 2, 1, len(world.context_frames) + 2]
    assert frames.shape == (3, 32, 32, 3)


def test_unknown_engine_setting_is_an_error():
    with pytest.raises(ValueError, match="unknown engine setting"):
        EngineConfig.from_dict({"steps": 2, "stepz": 3})


@pytest.mark.slow
def test_ten_thousand_frame_rollout_is_flat_in_memory_finite_and_moving():
    import resource
    world = make_tiny_world()
    eng = engine(world, steps=1)
    eng.reset(None)
    rng = np.random.default_rng(0)
    ptr = eng.cache.k.data_ptr()
    frames = []
    for i in range(10_000):
        f = eng.step(int(rng.integers(0, 4)))
        if i == 500:
            rss_warm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
        if i % 100 == 0:
            frames.append(f[0].astype(np.float32))
            assert torch.isfinite(eng.latents).all(), f"non-finite latents at frame {i}"
    rss_end = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert eng.cache.k.data_ptr() == ptr and eng.cache.counts[0] >= 9_999
    assert rss_end - rss_warm < 20 * 1024, f"peak RSS grew {(rss_end - rss_warm) / 1024:.1f} MiB"
    frames = np.stack(frames)
    assert frames.std(axis=0).mean() > 1.0  # frames change over the rollout (not frozen)


def test_chunkwise_engine_on_short_training_clips_keeps_a_whole_block_of_history():
    # 8-frame clips, 3-frame blocks: one sink block + the current block leave no room for a
    # window, so the engine gives up the sink rather than history (and runs).
    world = make_tiny_world(frames_per_block=3)
    engine = Engine(world, EngineConfig(steps=2))
    assert engine.cache.sink == 0 and engine.cache.window == 3
    engine.reset(seed=0)
    frames = [engine.step(a) for a in (0, 1, 2, 3, 0, 1, 2, 3, 0, 1)]  # past the cache's capacity
    assert all(f.shape == (1, 32, 32, 3) and f.dtype == np.uint8 for f in frames)


@pytest.mark.parametrize("block", [1, 3])
def test_warm_up_changes_nothing(block):
    """A warmed-up engine makes exactly the frames a fresh one does, seeded or not."""
    world = make_tiny_world(frames_per_block=block)
    ctx = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    runs = []
    for warm in (False, True):
        eng = engine(world, steps=2)
        if warm:
            eng.warm_up()
            assert eng.refresh_cost_ms is not None  # measured, so play can budget the refresh
        frames = [eng.reset(ctx)] + [eng.step(a) for a in (0, 1, 2, 3)]
        frames += [eng.reset(None, seed=3)] + [eng.step(a) for a in (2, 1)]
        runs.append(np.stack(frames))
    assert np.array_equal(runs[0], runs[1])
