"""backend="ort" (the DiT's steady-state calls as ONNX Runtime graphs) gives the eager numbers: the
same frames over rollouts that fill and wrap the KV ring, the same velocity and the same K/V
written by each call; bad settings fail with errors that name the fix.

Tolerance: both sides run float32 and the same maths; only the summation order differs (ORT fuses
Gemm+bias, LayerNorm, softmax). Measured: <= 1.5e-6 on latents and cached K of magnitude ~4 after
20 steps. 1e-4 leaves two orders of magnitude for other CPUs' kernels, while a wrong position, mask
or slot moves them by 1e-2 or more. Frames are uint8 after rounding: a latent 1e-6 off may flip a
pixel sitting on a .5 boundary, so frames may differ by one level, nowhere more.
"""

import importlib.util

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_world
from tests.test_dit import data, tiny
from worldmodel.engine import Engine, EngineConfig
from worldmodel.fused_refresh import refresh_and_forward

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = {"atol": 1e-4, "rtol": 1e-4}


@pytest.fixture
def ort():
    return pytest.importorskip("onnxruntime")


def rollout(world, backend: str, block: int, fuse: bool, batch: int, steps: int = 20):
    eng = Engine(world, EngineConfig(steps=2, sink=1, window=4, dtype="float32", seed=0, backend=backend,
                                     fuse_refresh=fuse), batch=batch)
    eng.reset(None)  # from noise: the ring fills eager, then wraps (5 slots, 20 frames)
    frames, latents = [], []
    for i in range(steps):
        eng.step([(i + w) % 4 for w in range(batch)])
        if batch > 1 and block == 1 and i == 7:  # world 1 restarts from a real context: worlds at
            # different frames (a chunk-wise batch resets as a whole)
            eng.reset(world.context_frames.numpy(), worlds=[1])
        frames.append(eng.frames.copy())
        latents.append(eng.latents.clone())
    return eng, np.stack(frames), torch.stack(latents)


@pytest.mark.parametrize("block,fuse,batch", [(1, True, 1), (1, False, 2), (2, True, 2)])
def test_ort_engine_makes_the_eager_frames(ort, block, fuse, batch):
    world = make_tiny_world(frames_per_block=block)
    ref_eng, ref_frames, ref_latents = rollout(world, "eager", block, fuse, batch)
    eng, frames, latents = rollout(world, "ort", block, fuse, batch)
    torch.testing.assert_close(latents, ref_latents, **TOL)
    assert np.abs(frames.astype(int) - ref_frames).max() <= 1
    torch.testing.assert_close(eng.cache.k, ref_eng.cache.k, **TOL)
    assert eng.cache.counts == ref_eng.cache.counts and eng.cache.slot_frame == ref_eng.cache.slot_frame
    # and the graphs did the work once the ring was full (not the eager fallback throughout)
    calls = eng.model.runs
    assert calls["forward"] >= 8 // block and calls["fused" if fuse else "refresh"] >= 6 // block


@pytest.mark.parametrize("block", [1, 3])
def test_each_call_gives_the_eager_velocity_and_writes_the_eager_kv(ort, block):
    from worldmodel.ort_backend import OrtDiT

    model = tiny(frames_per_block=block)
    window, sink = 2 * block, block
    x0, x, sigma, actions = data(model, 6 * block)
    cache = model.new_cache(2, window=window, sink=sink)
    with torch.no_grad():
        model.refresh(x0[:, :5 * block], actions[:, :5 * block], cache)  # full and wrapped once
        graphs = OrtDiT(model, batch=2, slots=cache.slots)
        b = slice(5 * block, 6 * block)
        torch.testing.assert_close(graphs.forward_cached(x[:, b], sigma[:, b], actions[:, b], cache),
                                   model.forward_cached(x[:, b], sigma[:, b], actions[:, b], cache), **TOL)
        eager, mine = cache.peek_advance(0), cache.peek_advance(0)  # same bookkeeping, storage...
        eager.k, eager.v = cache.k.clone(), cache.v.clone()         # ...and separate buffers
        mine.k, mine.v = cache.k.clone(), cache.v.clone()
        model.refresh(x0[:, b], actions[:, b], eager)
        graphs.refresh(x0[:, b], actions[:, b], mine)
        assert graphs.runs["refresh"] == 1 and mine.slot_frame == eager.slot_frame
        torch.testing.assert_close(mine.k, eager.k, **TOL)
        torch.testing.assert_close(mine.v, eager.v, **TOL)
        # the fused call on top: refresh block 6 and denoise block 7 in one graph
        x0n, xn, sn, an = data(model, block, seed=1)
        ref = refresh_and_forward(model, x0n, an, xn, sn, an, eager)
        out = graphs.refresh_and_forward(x0n, an, xn, sn, an, mine)
        assert graphs.runs["fused"] == 1
        torch.testing.assert_close(out, ref, **TOL)
        torch.testing.assert_close(mine.k, eager.k, **TOL)
        torch.testing.assert_close(mine.v, eager.v, **TOL)


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match=r"unknown backend 'nope'.*\['eager', 'ort', 'auto'\]"):
        EngineConfig(backend="nope")


def test_ort_refuses_what_it_cannot_run():
    world = make_tiny_world()
    with pytest.raises(ValueError, match="ort backend runs on cpu only; use backend=eager"):
        Engine(world, EngineConfig(backend="ort", device="cuda", dtype="float32"))
    with pytest.raises(ValueError, match="float32.*backend=eager"):
        Engine(world, EngineConfig(backend="ort", dtype="bfloat16"))


def test_missing_onnxruntime_names_the_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install -e \.\[ort\]"):
        Engine(make_tiny_world(), EngineConfig(backend="ort", dtype="float32"))


def test_failed_export_is_a_clear_error_not_a_silent_fallback(ort, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::something")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(RuntimeError, match="ONNX export of the DiT's forward call failed.*backend='eager'"):
        Engine(make_tiny_world(), EngineConfig(backend="ort", dtype="float32"))


def test_auto_backend_is_ort_where_it_can_run_and_eager_elsewhere(ort, monkeypatch):
    world = make_tiny_world()
    assert Engine(world, EngineConfig(backend="auto")).backend == "ort"
    assert Engine(world, EngineConfig(backend="auto", dtype="bfloat16")).backend == "eager"
    assert Engine(world, EngineConfig()).backend == "eager"           # the default stays eager
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == "onnxruntime" else real(m, *a))
    assert Engine(world, EngineConfig(backend="auto")).backend == "eager"  # not installed: no error
