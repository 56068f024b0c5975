"""Transformer stages: losses on hand-computed cases, and tokenizer -> teacher -> ar end to end."""

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import randomize
from train.app import main as train_main
from train.objectives._dit import drop_actions, flow_matching_loss
from worldmodel import diffusion
from worldmodel.dit import DiT, DiTConfig
from worldmodel.engine import Engine


def small_dit(**kw) -> DiT:
    return DiT(DiTConfig(width=32, depth=1, heads=2, latent_size=2, latent_channels=3, num_actions=3,
                         max_frames=8, train_frames=4, **kw))


@pytest.mark.parametrize("teacher_forcing", [False, True])
def test_flow_loss_of_a_fresh_model_is_the_target_norm(teacher_forcing):
    """A fresh DiT predicts v = 0 (zero-init head), so the loss is mean |eps - x0|^2 exactly."""
    dit = small_dit()
    x0 = torch.randn(2, 4, 2, 2, 3)
    actions = torch.randint(0, 3, (2, 4))
    sigma = torch.rand(2, 4)
    torch.manual_seed(7)
    loss, _ = flow_matching_loss(dit, x0, actions, sigma, "uniform", 3.0,
                                 clean=x0 if teacher_forcing else None)
    torch.manual_seed(7)
    eps = torch.randn_like(x0)
    torch.testing.assert_close(loss, (eps - x0).pow(2).mean())


def test_bump_weighting_multiplies_per_frame_errors():
    dit = small_dit()
    x0 = torch.randn(1, 4, 2, 2, 3)
    sigma = torch.tensor([[0.1, 0.4, 0.7, 0.95]])
    torch.manual_seed(3)
    loss, _ = flow_matching_loss(dit, x0, torch.zeros(1, 4, dtype=torch.long), sigma, "bump", 3.0)
    torch.manual_seed(3)
    per_frame = (torch.randn_like(x0) - x0).pow(2).mean(dim=(2, 3, 4))
    expected = (diffusion.loss_weight(sigma, "bump", 3.0) * per_frame).mean()
    torch.testing.assert_close(loss, expected)


def test_motion_term_adds_the_loss_over_moving_latents_only():
    """Frames 0-1 differ in one latent (a 'ball' that moves), frames 1-2 are equal, 2-3 differ in
    another: the motion term is motion x the mean error over exactly those latents, per frame."""
    dit = small_dit()
    x0 = torch.zeros(1, 4, 2, 2, 3)
    x0[0, 0, 0, 0] = 2.0          # frame 0 -> 1: latent (0, 0) changes
    x0[0, 3, 1, 1] = -2.0         # frame 2 -> 3: latent (1, 1) changes
    sigma = torch.full((1, 4), 0.5)
    actions = torch.zeros(1, 4, dtype=torch.long)
    torch.manual_seed(5)
    plain, logs0 = flow_matching_loss(dit, x0, actions, sigma, "uniform", 3.0)
    torch.manual_seed(5)
    loss, logs = flow_matching_loss(dit, x0, actions, sigma, "uniform", 3.0, motion=4.0, motion_threshold=0.5)
    torch.manual_seed(5)
    err = (torch.randn_like(x0) - x0).pow(2).mean(dim=4)[0]       # (F, h, w): a fresh model's v = 0
    moving = [err[0, 0, 0], err[1, 0, 0], err[2, 1, 1], err[3, 1, 1]]  # one moving latent per frame
    torch.testing.assert_close(plain, err.mean())
    torch.testing.assert_close(loss, err.mean() + 4.0 * torch.stack(moving).mean())
    torch.testing.assert_close(logs["flow"], plain)                   # validation reads the plain loss
    torch.testing.assert_close(logs["moving_frac"], torch.tensor(4 / 16))
    # a static clip has no moving latent: the term adds nothing
    torch.manual_seed(5)
    static, _ = flow_matching_loss(dit, torch.zeros_like(x0), actions, sigma, "uniform", 3.0, motion=4.0)
    torch.manual_seed(5)
    torch.testing.assert_close(static, torch.randn_like(x0).pow(2).mean())


def test_teacher_forcing_loss_gradient_reaches_clean_context_only_from_later_frames():
    """d loss_i / d clean_j is zero for j >= i (frame-wise): the mask really is causal."""
    from tests.conftest import randomize
    dit = randomize(small_dit(), seed=2, std=0.1)
    x0 = torch.randn(1, 4, 2, 2, 3)
    clean = x0.clone().requires_grad_(True)
    eps = torch.randn_like(x0)
    sigma = torch.full((1, 4), 0.5)
    x = diffusion.add_noise(x0, eps, sigma)
    v = dit(x, sigma, torch.zeros(1, 4, dtype=torch.long), clean=clean)
    v[:, 1].sum().backward()  # frame 1 may depend on clean frame 0 only
    g = clean.grad.abs().sum(dim=(2, 3, 4))[0]
    assert g[0] > 0 and torch.all(g[1:] == 0)


def test_action_dropout_drops_whole_clips():
    torch.manual_seed(0)
    a = torch.randint(0, 3, (1000, 5))
    d = drop_actions(a, 0.3)
    dropped = (d == -1).all(dim=1)
    assert ((d == -1).any(dim=1) == dropped).all()  # never partial
    assert 0.25 < dropped.float().mean() < 0.35


def test_tokenizer_teacher_ar_pipeline_exports_a_playable_world(tmp_path):
    runs = tmp_path / "runs"
    common = ["data=synthetic", "model=tiny", f"runs_root={runs}", "max_steps=2", "progress=false",
              "data.synthetic.episodes=4", "data.synthetic.episode_len=24"]
    assert train_main(["stage=tokenizer", *common]) == 0
    assert train_main(["stage=teacher", "stage.num_actions=4", "data.batch_size=2", *common]) == 0
    assert train_main(["stage=ar", "stage.num_actions=4", "data.batch_size=2", *common]) == 0
    check_action_gain(runs)
    world = Path(runs) / "ar" / "export" / "world.safetensors"
    eng = Engine.load(world, steps=2, sampler="few_step", dtype="float32")
    frame = eng.reset(eng.world.context_frames.numpy(), eng.world.context_actions.numpy())
    assert frame.shape == (1, 64, 64, 3)
    assert eng.step(1).dtype == np.uint8


def check_action_gain(runs: Path) -> None:
    """The validation's action gain (loss with other clips' actions minus loss with the true
    ones, same noise) is exactly 0 for a model blind to actions and not 0 for one that sees them."""
    from omegaconf import OmegaConf

    from train.app import compose_config
    from train.data import build_data, clip_batches
    from train.loop import build_objective
    from train.objectives import TrainContext

    cfg = compose_config(["stage=ar", "data=synthetic", "model=tiny", f"runs_root={runs}", "stage.num_actions=4",
                          "data.batch_size=4", "data.synthetic.episodes=4", "data.synthetic.episode_len=24"])
    dev = torch.device("cpu")
    ctx = TrainContext(device=dev, dtype=torch.float32, rank=0, world_size=1, run_dir=runs / "gain",
                       init_from=runs / "ar" / "export", model=OmegaConf.to_container(cfg.model, resolve=True),
                       seed=0)
    source = build_data(cfg.data, rank=0, world_size=1, device=dev, run_dir=runs / "gain")
    ctx.extra["action_names"] = list(source.action_names)
    objective = build_objective(cfg.stage, ctx)
    dit = randomize(objective.dit.eval())  # 2 training steps leave the zero-init gates near 0

    def gains() -> list[float]:
        batches = clip_batches(source, cfg.data, seed=5, rank=0, world_size=1, device=dev)
        out = objective.evaluate(0, {"dit": dit}, batches)
        return [v for k, v in out.items() if k.startswith("action_gain@")]

    with torch.no_grad():
        assert len(gains()) == 4 and all(abs(g) > 1e-6 for g in gains())
        for emb in (dit.action_token, dit.action_cond):
            emb.weight.zero_()
    assert gains() == [0.0] * 4
