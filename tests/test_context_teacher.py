"""The context teacher (clean leading frames) and what uses it: its noise layout and loss, DMD's
clean-context scores, and the joint evaluation protocol feeding its known frames clean."""

from types import SimpleNamespace

import numpy as np
import torch

from tests.conftest import make_tiny_world
from train.objectives._dit import flow_matching_loss
from train.objectives.dmd import DMDConfig, DMDObjective
from train.objectives.teacher import TeacherConfig, TeacherObjective
from train.eval.rollout import JointRollout
from worldmodel.dit import DiT, DiTConfig
from worldmodel.engine import EngineConfig


def test_flow_loss_leaves_frames_given_clean_out_of_the_mean():
    """A fresh DiT predicts v = 0, so the loss is mean |eps - x0|^2 over the NOISY frames only."""
    dit = DiT(DiTConfig(width=32, depth=1, heads=2, latent_size=2, latent_channels=3, num_actions=3,
                        max_frames=8, train_frames=4))
    x0 = torch.randn(2, 4, 2, 2, 3)
    sigma = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.3, 0.3, 0.3]])
    torch.manual_seed(1)
    loss, logs = flow_matching_loss(dit, x0, torch.zeros(2, 4, dtype=torch.long), sigma, "uniform", 3.0)
    torch.manual_seed(1)
    per_frame = (torch.randn_like(x0) - x0).pow(2).mean(dim=(2, 3, 4))
    expected = (per_frame[0, 2:].sum() + per_frame[1, 1:].sum()) / 5
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logs["mse"], expected)


def test_context_teacher_gives_clean_leading_frames_to_a_share_of_clips():
    torch.manual_seed(0)
    stage = SimpleNamespace(cfg=TeacherConfig(context_frames=3, context_prob=0.4),
                            ctx=SimpleNamespace(device=torch.device("cpu")))
    sigma = TeacherObjective.noise_levels(stage, 4000, 8)
    clean = sigma == 0
    given = clean.sum(dim=1)
    # the clean frames are a prefix, 1..3 long, in about 40% of the clips, equally often each length
    assert torch.equal(clean, torch.arange(8)[None, :] < given[:, None])
    assert given.max() == 3 and abs((given > 0).float().mean().item() - 0.4) < 0.03
    for c in (1, 2, 3):
        assert abs((given == c).float().mean().item() - 0.4 / 3) < 0.025
    # the rest of a clip shares one level (the teacher's one-sigma-per-clip layout)
    last = sigma[:, -1:]
    assert torch.equal(torch.where(clean, last, sigma), last.expand_as(sigma)) and (last > 0).all()
    plain = SimpleNamespace(cfg=TeacherConfig(), ctx=stage.ctx)
    assert (TeacherObjective.noise_levels(plain, 500, 8) > 0).all()


def test_dmd_clean_context_zeroes_the_score_level_on_context_frames_only():
    mask = torch.ones(6, 8, dtype=torch.bool)
    mask[:3, :1] = False  # three samples started from one real frame
    torch.manual_seed(2)
    plain = DMDObjective.noise_level(SimpleNamespace(cfg=DMDConfig()), mask)
    torch.manual_seed(2)
    clean = DMDObjective.noise_level(SimpleNamespace(cfg=DMDConfig(clean_context=True)), mask)
    assert torch.equal(clean[mask], plain[mask]) and (plain > 0).all()
    assert (clean[~mask] == 0).all()


class Spy(torch.nn.Module):
    """Wraps a DiT and keeps every call's (x, sigma)."""

    def __init__(self, dit: DiT) -> None:
        super().__init__()
        self.dit, self.cfg, self.calls = dit, dit.cfg, []

    def forward(self, x, sigma, actions, **kw):
        self.calls.append((x.detach().clone(), sigma.detach().clone()))
        return self.dit(x, sigma, actions, **kw)


def run_joint(context_frames: int | None):
    world = make_tiny_world(context=8)
    if context_frames is not None:
        world.info["context_frames"] = context_frames
    roll = JointRollout(world, EngineConfig(steps=3, sampler="euler", dtype="float32", cfg_scale=1.0))
    roll.dit = Spy(roll.dit)
    ctx = world.context_frames.numpy()[None]
    acts = world.context_actions.numpy()[None]
    out = roll.run(ctx, acts, np.array([[0, 1, 2, 3]]), seed=0)
    known = roll.tokenizer.encode(torch.from_numpy(ctx[:, -roll.context:])).float()
    return out, roll, known


def test_joint_protocol_feeds_a_context_teacher_its_known_frames_clean():
    out, roll, known = run_joint(context_frames=4)
    k = roll.context
    assert roll.clean_known and out.shape == (1, 4, 32, 32, 3)
    x, sigma = roll.dit.calls[0]
    torch.testing.assert_close(x[:, :k], known)
    assert (sigma[:, :k] == 0).all() and (sigma[:, k:] > 0).all()
    # a plain teacher (or one trained with fewer clean frames) gets them by replacement, as before
    for trained in (None, 1):
        _, roll, known = run_joint(trained)
        x, sigma = roll.dit.calls[0]
        assert not roll.clean_known and (sigma > 0).all()
        assert not torch.allclose(x[:, :k], known)
