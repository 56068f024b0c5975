"""The DMD self-rollout really runs the KV-cache engine: same noise + weights -> same frames."""

import dataclasses

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_world, randomize
from train.self_rollout import self_rollout
from worldmodel import diffusion
from worldmodel.dit import DiT
from worldmodel.engine import Engine, EngineConfig


@pytest.mark.parametrize("steps", [1, 2])
def test_rollout_equals_engine(steps):
    world = make_tiny_world()
    eng = Engine(world, EngineConfig(steps=steps, first_frame_steps=4, sink=1, dtype="float32"))
    acts = [1, 3, 0, 2, 2]
    eng.reset(None, seed=11)
    latents = [eng.latents.clone()]
    frames = []
    for a in acts:
        frames.append(eng.step(a))
        latents.append(eng.latents.clone())
    actions = torch.tensor([[-1, *acts]])
    rng = torch.Generator().manual_seed(11)
    with torch.no_grad():
        x_hat = self_rollout(world.dit, actions, diffusion.step_list(steps), diffusion.first_frame_steps(),
                             exit_step=steps - 1, first_exit=3, rng=rng, grad=False)
    torch.testing.assert_close(x_hat[0], torch.stack(latents, 1)[0], atol=1e-5, rtol=1e-5)
    decoded = world.tokenizer.decode(x_hat[:, 1:]).numpy()
    assert np.array_equal(decoded[0], np.concatenate(frames))


class GradRecorder(torch.nn.Module):
    """Wraps the DiT as DDP does (``.module``) and records, per model call, whether grad was on."""

    def __init__(self, dit):
        super().__init__()
        self.module = dit
        self.grad: list[bool] = []

    def forward(self, *args, **kwargs):
        self.grad.append(torch.is_grad_enabled())
        return self.module(*args, **kwargs)


def test_gradient_flows_only_through_exit_steps():
    """Block 0 (from noise) runs the first-frame list up to first_exit = 2: calls 0, 1 without grad,
    call 2 with it; each later block runs the 2-step list to exit_step = 1: one call without grad,
    then the exit call with grad. Refreshes go to the DiT directly (no grad, not counted)."""
    world = make_tiny_world()
    net = GradRecorder(world.dit.train())
    actions = torch.tensor([[0, 1, 2, 3]])
    x_hat = self_rollout(net, actions, diffusion.step_list(2), diffusion.first_frame_steps(),
                         exit_step=1, first_exit=2, rng=torch.Generator().manual_seed(0))
    assert net.grad == [False, False, True] + [False, True] * 3
    assert x_hat.requires_grad
    x_hat.sum().backward()
    assert net.module.head.weight.grad is not None and net.module.head.weight.grad.abs().sum() > 0
    # exit at step 0 of a 1-step list: the only call of each block is the exit, so all carry grad
    net.grad.clear()
    self_rollout(net, actions, diffusion.step_list(1), diffusion.first_frame_steps(),
                 exit_step=0, first_exit=0, rng=torch.Generator().manual_seed(0))
    assert net.grad == [True] * 4
    # with real context the context frames cost no call; grad=False: no call carries grad
    net.grad.clear()
    self_rollout(net, actions, diffusion.step_list(2), diffusion.first_frame_steps(), exit_step=1,
                 first_exit=3, rng=torch.Generator().manual_seed(0), context=torch.randn(1, 2, 4, 4, 4))
    assert net.grad == [False, True] * 2
    net.grad.clear()
    self_rollout(net, actions, diffusion.step_list(2), diffusion.first_frame_steps(), exit_step=1,
                 first_exit=2, rng=torch.Generator().manual_seed(0), grad=False)
    assert net.grad == [False] * 9


def test_context_frames_pass_through():
    world = make_tiny_world()
    ctx = torch.randn(1, 2, 4, 4, 4)
    x_hat = self_rollout(world.dit, torch.tensor([[0, 1, 2, 3]]), diffusion.step_list(1),
                         diffusion.first_frame_steps(), exit_step=0, first_exit=3,
                         rng=torch.Generator().manual_seed(0), context=ctx, grad=False)
    assert torch.equal(x_hat[:, :2], ctx) and x_hat.shape == (1, 4, 4, 4, 4)


def test_rollout_equals_engine_over_a_whole_training_clip():
    """The longest rollout there is: train_frames (8) frames, the last one generated against a
    cache of 7 frames -- the engine's sink + window, exactly full. The rollout's own cache is
    sized to its clip and never evicts (longer clips are refused: DMD's clips are training clips),
    so this is where the two must still agree; past it only the engine runs (next test)."""
    world = make_tiny_world()
    eng = Engine(world, EngineConfig(steps=2, first_frame_steps=4, sink=1, dtype="float32"))
    assert eng.cache.slots == world.dit.cfg.train_frames - 1
    acts = [1, 3, 0, 2, 2, 1, 0]
    eng.reset(None, seed=5)
    latents = [eng.latents.clone()]
    for a in acts:
        eng.step(a)
        latents.append(eng.latents.clone())
    assert eng.cache.counts == [eng.cache.slots]  # frames 0..6 cached when frame 7 was made
    with torch.no_grad():
        x_hat = self_rollout(world.dit, torch.tensor([[-1, *acts]]), diffusion.step_list(2),
                             diffusion.first_frame_steps(), exit_step=1, first_exit=3,
                             rng=torch.Generator().manual_seed(5), grad=False)
    torch.testing.assert_close(x_hat[0], torch.stack(latents, 1)[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exceeds"):
        self_rollout(world.dit, torch.tensor([[-1, *acts, 0]]), diffusion.step_list(2),
                     diffusion.first_frame_steps(), exit_step=1, first_exit=3, grad=False)


@pytest.mark.parametrize("steps,sink", [(1, 1), (2, 1), (2, 2)])
def test_engine_past_the_cache_window_equals_a_rollout_from_its_kept_frames(steps, sink):
    """Past the window the engine keeps the sink frames and the last W frames, re-based to
    positions 0 .. S+W-1. For a ONE-layer DiT a cached frame's keys/values depend on that frame
    alone, so the engine's frame n must equal a rollout whose context is exactly those kept frames
    (same latents, same actions, same noise), generating one frame after them. A cache that
    evicted a sink, kept the wrong frames or mis-placed positions breaks the equality."""
    base = make_tiny_world()
    dit = DiT(dataclasses.replace(base.dit.cfg, depth=1))
    world = dataclasses.replace(base, dit=randomize(dit, seed=3, std=0.1).eval())
    eng = Engine(world, EngineConfig(steps=steps, first_frame_steps=4, sink=sink, dtype="float32"))
    window, slots = eng.cache.window, eng.cache.slots
    assert eng.cache.sink == sink and slots == world.dit.cfg.train_frames - 1
    acts = [int(a) for a in torch.randint(0, 4, (slots + 5,), generator=torch.Generator().manual_seed(1))]
    eng.reset(None, seed=9)
    latents, all_acts, states = [eng.latents.clone()], [-1], []
    for a in acts:
        states.append(eng.generator.get_state())
        eng.step(a)
        latents.append(eng.latents.clone())
        all_acts.append(a)
    checked = 0
    for n in range(slots, len(latents)):  # frame n is made after n >= slots frames: evictions
        keep = list(range(sink)) + list(range(n - window, n))
        rng = torch.Generator()
        rng.set_state(states[n - 1])
        with torch.no_grad():
            x_hat = self_rollout(world.dit, torch.tensor([[all_acts[i] for i in keep] + [all_acts[n]]]),
                                 diffusion.step_list(steps), diffusion.first_frame_steps(),
                                 exit_step=steps - 1, first_exit=3, rng=rng, grad=False,
                                 context=torch.stack([latents[i] for i in keep], 1))
        torch.testing.assert_close(x_hat[:, -1], latents[n], atol=1e-5, rtol=1e-5)
        checked += 1
    assert checked == 6 and eng.cache.counts[0] == len(latents) - 1
