"""The DMD self-rollout really runs the KV-cache engine: same noise + weights -> same frames."""

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_world
from train.rollout import self_rollout
from worldmodel import diffusion
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


def test_gradient_flows_only_through_exit_steps():
    world = make_tiny_world()
    dit = world.dit.train()
    actions = torch.tensor([[0, 1, 2, 3]])
    x_hat = self_rollout(dit, actions, diffusion.step_list(2), diffusion.first_frame_steps(),
                         exit_step=1, first_exit=2, rng=torch.Generator().manual_seed(0))
    assert x_hat.requires_grad
    x_hat.sum().backward()
    assert dit.head.weight.grad is not None and dit.head.weight.grad.abs().sum() > 0


def test_context_frames_pass_through():
    world = make_tiny_world()
    ctx = torch.randn(1, 2, 4, 4, 4)
    x_hat = self_rollout(world.dit, torch.tensor([[0, 1, 2, 3]]), diffusion.step_list(1),
                         diffusion.first_frame_steps(), exit_step=0, first_exit=3,
                         rng=torch.Generator().manual_seed(0), context=ctx, grad=False)
    assert torch.equal(x_hat[:, :2], ctx) and x_hat.shape == (1, 4, 4, 4, 4)
