"""Distillation maths: the CD target by hand, DMD on a 2-D Gaussian mixture with closed-form scores."""


import torch

from tests.conftest import randomize
from train.distill import (consistency_target, critic_flow_loss, dmd_gradient, dmd_loss,
                           dmd_noise_level, teacher_cfg_euler_step)
from worldmodel.dit import DiT, DiTConfig


def tiny_dit(seed: int) -> DiT:
    cfg = DiTConfig(width=32, depth=1, heads=2, latent_size=2, latent_channels=3, num_actions=3,
                    max_frames=8, train_frames=4)
    return randomize(DiT(cfg).eval(), seed=seed, std=0.1)


def test_cd_target_is_a_teacher_euler_step_then_the_ema_x0():
    teacher, ema = tiny_dit(0), tiny_dit(1)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 2, 2, 3, generator=g)
    x_t = torch.randn(2, 3, 2, 2, 3, generator=g)
    actions = torch.tensor([[0, 1, 2], [2, 2, 1]])
    null = torch.full_like(actions, -1)
    sig_t, sig_s = torch.full((2, 3), 0.7), torch.full((2, 3), 0.55)
    w = 2.5
    with torch.no_grad():
        x_s = teacher_cfg_euler_step(lambda x, s: teacher(x, s, actions, clean=x0),
                                     lambda x, s: teacher(x, s, null, clean=x0), x_t, sig_t, sig_s, w)
        got = consistency_target(lambda x, s: ema(x, s, actions, clean=x0), x_s, sig_s)
        # by hand
        vc, vu = teacher(x_t, sig_t, actions, clean=x0), teacher(x_t, sig_t, null, clean=x0)
        v = vu + w * (vc - vu)
        xs_hand = x_t + (0.55 - 0.7) * v
        want = xs_hand - 0.55 * ema(xs_hand, sig_s, actions, clean=x0)
    torch.testing.assert_close(x_s, xs_hand)
    torch.testing.assert_close(got, want)


def test_terminal_pair_target_is_the_euler_endpoint_without_a_network_call():
    calls = []
    x_s = torch.randn(2, 3, 2, 2, 3)
    got = consistency_target(lambda x, s: calls.append(1) or x, x_s, torch.zeros(2, 3))
    assert torch.equal(got, x_s) and not calls
    # mixed batch: row 0 terminal, row 1 not
    sig = torch.tensor([[0.0] * 3, [0.5] * 3])
    got = consistency_target(lambda x, s: torch.ones_like(x), x_s, sig)
    assert torch.equal(got[0], x_s[0]) and torch.allclose(got[1], x_s[1] - 0.5)


def mixture_x0(x_t: torch.Tensor, sigma: torch.Tensor, means: torch.Tensor, std: float) -> torch.Tensor:
    """E[x0 | x_sigma] for x0 ~ equal mixture of N(mean_k, std^2 I) (closed form), x (N, D)."""
    a = 1 - sigma  # (N, 1)
    var = a**2 * std**2 + sigma**2
    d2 = ((x_t[:, None, :] - a[:, None] * means[None]) ** 2).sum(-1)  # (N, K)
    resp = torch.softmax(-d2 / (2 * var), dim=1)
    comp = means[None] + (a * std**2 / var)[:, None] * (x_t[:, None, :] - a[:, None] * means[None])
    return (resp[..., None] * comp).sum(1)


def as5d(x: torch.Tensor) -> torch.Tensor:
    return x[:, None, None, None, :]


def test_dmd_gradient_points_from_fake_to_real():
    torch.manual_seed(0)
    real_mean, fake_mean = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    x_hat = fake_mean + 0.3 * torch.randn(512, 2)
    sigma = torch.full((512, 1), 0.5)
    x_t = (1 - sigma) * x_hat + sigma * torch.randn(512, 2)
    g = dmd_gradient(as5d(x_hat), as5d(mixture_x0(x_t, sigma, real_mean, 0.3)),
                     as5d(mixture_x0(x_t, sigma, fake_mean, 0.3)))[:, 0, 0, 0]
    step = -g  # gradient descent direction on x_hat
    assert (step[:, 0] > 0).float().mean() > 0.95  # toward the real mode at x = 3
    assert step[:, 0].mean() > 5 * step[:, 1].abs().mean()
    # dmd_loss has d loss / d x_hat = grad / numel
    xh = as5d(x_hat).clone().requires_grad_(True)
    dmd_loss(xh, as5d(g)).backward()
    torch.testing.assert_close(xh.grad.float(), as5d(g) / xh.numel(), atol=1e-9, rtol=1e-6)


def test_dmd_moves_a_generator_onto_the_target_modes():
    """DMD at toy scale: an MLP generator of 2-D points, the closed-form real score of a two-mode
    mixture, and the fake score of the generator's own current distribution (a kernel density
    estimate of a fresh batch of its samples, also closed form). A "sample" is 32 points, so the
    per-sample DMD normaliser averages over many values as it does over an image's pixels."""
    torch.manual_seed(0)
    means, std = torch.tensor([[-2.0, 0.0], [2.0, 0.0]]), 0.15
    gen = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.SiLU(), torch.nn.Linear(64, 2))
    opt = torch.optim.Adam(gen.parameters(), lr=3e-2)
    b, p = 16, 32

    def dist(x):
        return torch.cdist(x, means).min(dim=1).values

    start = dist(gen(torch.randn(2048, 2))).detach()
    for _ in range(250):
        x_hat = gen(torch.randn(b * p, 2))
        with torch.no_grad():
            fake_samples = gen(torch.randn(512, 2))
        sigma = dmd_noise_level(b, 3.0, "cpu").repeat_interleave(p, 0)
        x_t = (1 - sigma) * x_hat.detach() + sigma * torch.randn_like(x_hat)
        with torch.no_grad():
            g = dmd_gradient(x_hat.detach().view(b, 1, 1, p, 2),
                             mixture_x0(x_t, sigma, means, std).view(b, 1, 1, p, 2),
                             mixture_x0(x_t, sigma, fake_samples, 0.1).view(b, 1, 1, p, 2))
        opt.zero_grad()
        dmd_loss(x_hat.view(b, 1, 1, p, 2), g).float().backward()
        opt.step()
    samples = gen(torch.randn(2048, 2)).detach()
    end = dist(samples)
    # measured: mean distance 1.7 -> 0.55, samples within 0.5 of a mode 10% -> 68%
    assert start.mean() > 1.2 and end.mean() < 0.7, (start.mean(), end.mean())
    assert (start < 0.5).float().mean() < 0.25 and (end < 0.5).float().mean() > 0.55
    left = (samples[:, 0] < 0).float().mean().item()
    assert 0.15 < left < 0.85, left  # both modes populated, no collapse onto one


def test_critic_flow_loss_is_zero_for_the_exact_velocity_and_masks_frames():
    x_hat, eps = torch.randn(2, 3, 2, 2, 1), torch.randn(2, 3, 2, 2, 1)
    assert critic_flow_loss(eps - x_hat, eps, x_hat) == 0
    v = eps - x_hat
    v[:, 0] += 1.0  # error only on frame 0
    mask = torch.tensor([[False, True, True]] * 2)
    assert critic_flow_loss(v, eps, x_hat, mask) == 0
    torch.testing.assert_close(critic_flow_loss(v, eps, x_hat), torch.tensor(1 / 3))
