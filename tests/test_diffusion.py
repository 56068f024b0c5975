"""Behaviour of the rectified-flow parameterisation in worldmodel.diffusion."""

import pytest
import torch

from worldmodel import diffusion as D


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# shift


def test_shift_endpoints_identity_and_inverse():
    u = torch.linspace(0, 1, 101)
    for s in (1.0, 3.0, 5.0):
        sigma = D.shift(u, s)
        assert sigma.dtype == torch.float32
        assert sigma[0] == 0 and sigma[-1] == 1
        assert torch.all(sigma[1:] > sigma[:-1])  # monotone
        torch.testing.assert_close(D.inverse_shift(sigma, s), u, atol=1e-6, rtol=0)
    torch.testing.assert_close(D.shift(u, 1.0), u)
    # s > 1 moves mass towards high noise: the midpoint maps above 1/2
    assert D.shift(0.5, 3.0) == pytest.approx(0.75)
    assert D.inverse_shift(0.75, 3.0) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        D.shift(0.5, 0.0)


def test_timestep_is_1000_sigma_fp32():
    t = D.timestep(torch.tensor([[1.0, 0.625]], dtype=torch.float64))
    assert t.dtype == torch.float32
    torch.testing.assert_close(t, torch.tensor([[1000.0, 625.0]]))


# ---------------------------------------------------------------------------------------------
# noise-level sampling


def test_sample_noise_level_is_shifted_uniform():
    sigma = D.sample_noise_level((20000,), 5.0, generator=_gen())
    assert sigma.dtype == torch.float32
    assert sigma.min() > 0 and sigma.max() <= 1
    u = D.inverse_shift(sigma, 5.0)  # must be Uniform(0, 1]
    assert abs(u.mean().item() - 0.5) < 0.01
    assert abs(u.var().item() - 1 / 12) < 0.005
    # with s = 5: P(t > 900) = 1 - inverse_shift(0.9) = 0.357, P(t > 500) = 0.833
    assert abs((sigma > 0.9).float().mean().item() - 0.36) < 0.015
    assert abs((sigma > 0.5).float().mean().item() - 0.83) < 0.015


def test_sample_noise_level_seeded_and_clamped():
    a = D.sample_noise_level((4, 8), 3.0, generator=_gen(7))
    b = D.sample_noise_level((4, 8), 3.0, generator=_gen(7))
    assert torch.equal(a, b)
    c = D.sample_noise_level((4000,), 5.0, generator=_gen(), clamp=(0.02, 0.98))
    assert c.min() >= 0.02 and c.max() <= 0.98
    assert (c == 0.98).any()  # shift 5 puts ~9% of the draws above 0.98


def test_block_noise_level_shares_sigma_within_blocks():
    sigma = D.sample_block_noise_level((3, 10), 3.0, frames_per_block=4, generator=_gen())
    assert sigma.shape == (3, 10) and sigma.dtype == torch.float32
    for lo, hi in ((0, 4), (4, 8), (8, 10)):  # last block is short
        assert torch.all(sigma[:, lo:hi] == sigma[:, lo : lo + 1])
    assert torch.all(sigma[:, 0] != sigma[:, 4]) and torch.all(sigma[:, 4] != sigma[:, 8])
    # frames_per_block = 1 is the independent per-frame (diffusion-forcing) case
    per_frame = D.sample_block_noise_level((2, 6), 3.0, 1, generator=_gen(1))
    torch.testing.assert_close(per_frame, D.sample_noise_level((2, 6), 3.0, generator=_gen(1)))
    with pytest.raises(ValueError):
        D.sample_block_noise_level((2, 6), 3.0, 0)


# ---------------------------------------------------------------------------------------------
# forward process and conversions


def test_add_noise_velocity_x0_round_trips():
    g = _gen()
    x0 = torch.randn(2, 3, 4, 5, generator=g)
    eps = torch.randn(2, 3, 4, 5, generator=g)
    sigma = torch.tensor([[0.1, 0.5, 0.9], [1.0, 0.3, 0.02]])
    x = D.add_noise(x0, eps, sigma)
    v = D.velocity_target(x0, eps)
    torch.testing.assert_close(D.x0_from_velocity(x, v, sigma), x0)
    torch.testing.assert_close(D.velocity_from_x0(x, x0, sigma), v, atol=1e-4, rtol=1e-4)
    # end points of the path: sigma = 0 is the data, sigma = 1 is the noise
    torch.testing.assert_close(D.add_noise(x0, eps, torch.zeros(2, 3)), x0)
    torch.testing.assert_close(D.add_noise(x0, eps, torch.ones(2, 3)), eps)
    # v is the sigma-derivative of the path: a finite difference recovers it
    h = 1e-2
    fd = (D.add_noise(x0, eps, sigma + h) - D.add_noise(x0, eps, sigma - h)) / (2 * h)
    torch.testing.assert_close(fd, v, atol=1e-4, rtol=1e-4)


def test_sigma_is_broadcast_per_frame():
    x0 = torch.randn(2, 3, 4, generator=_gen())
    eps = torch.randn(2, 3, 4, generator=_gen(1))
    sigma = torch.tensor([[0.1, 0.5, 0.9], [0.2, 0.4, 0.6]])
    x = D.add_noise(x0, eps, sigma)
    for b in range(2):
        for t in range(3):
            s = sigma[b, t].item()
            torch.testing.assert_close(x[b, t], (1 - s) * x0[b, t] + s * eps[b, t])
    # (B, 1) means one level for the whole clip
    clip = sigma[:, :1]
    torch.testing.assert_close(D.add_noise(x0, eps, clip), D.add_noise(x0, eps, clip.expand(2, 3)))


def test_noise_level_math_stays_fp32_with_bf16_inputs():
    x = torch.randn(1, 2, 8).to(torch.bfloat16)
    v = torch.randn(1, 2, 8).to(torch.bfloat16)
    sigma = torch.tensor([[0.9375, 0.8333]])
    assert D.x0_from_velocity(x, v, sigma).dtype == torch.float32
    assert D.euler_step(x, v, sigma, sigma / 2).dtype == torch.float32
    # a bf16 sigma is promoted, but its value was already rounded: 0.8333 -> 0.83203125
    assert D.timestep(sigma.to(torch.bfloat16))[0, 1].item() == pytest.approx(832.03125)


def test_euler_step_hand_computed():
    x = torch.tensor([[[1.0, 2.0]]])  # (B=1, T=1, 2)
    v = torch.tensor([[[0.5, -1.0]]])
    out = D.euler_step(x, v, torch.tensor([[0.8]]), torch.tensor([[0.6]]))
    torch.testing.assert_close(out, torch.tensor([[[0.9, 2.2]]]))
    # one step along the exact velocity moves exactly along the straight path
    x0, eps = torch.randn(1, 1, 5, generator=_gen()), torch.randn(1, 1, 5, generator=_gen(1))
    step = D.euler_step(D.add_noise(x0, eps, 0.7), D.velocity_target(x0, eps), 0.7, 0.2)
    torch.testing.assert_close(step, D.add_noise(x0, eps, 0.2))


# ---------------------------------------------------------------------------------------------
# step lists and grids


@pytest.mark.parametrize(
    "s, expected",
    [
        (5.0, {4: [1.0, 0.9375, 0.8333, 0.625], 2: [1.0, 0.8333], 1: [1.0]}),
        (3.0, {4: [1.0, 0.9, 0.75, 0.5], 2: [1.0, 0.75], 1: [1.0]}),
    ],
)
def test_step_lists_match_causal_forcing(s, expected):
    for k, values in expected.items():
        got = D.step_list(k, s)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, torch.tensor(values), atol=5e-5, rtol=0)
    torch.testing.assert_close(D.first_frame_steps(s), D.step_list(4, s))


def test_step_list_defaults_and_validation():
    torch.testing.assert_close(D.step_list(4), torch.tensor([1.0, 0.9, 0.75, 0.5]))  # s = 3 default
    for bad in (0, 3, 8, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_steps"):
            D.step_list(bad)


def test_grid_end_points_and_terminal():
    g = D.grid(32, 3.0)
    assert g.shape == (33,) and g.dtype == torch.float32
    assert g[0] == 1.0 and g[-1] == 0.0
    assert g[-2].item() == pytest.approx(D.shift(1 / 32, 3.0))
    assert torch.all(g[1:] < g[:-1])
    torch.testing.assert_close(D.grid(32, 3.0, include_terminal=False), g[:-1])
    with pytest.raises(ValueError):
        D.grid(0)


def test_4_step_list_sits_on_the_48_grid():
    # with s = 5 the warped 4-step times are grid indices 0, 12, 24, 36 of the 48-point grid
    torch.testing.assert_close(D.grid(48, 5.0)[[0, 12, 24, 36]], D.step_list(4, 5.0))
    torch.testing.assert_close(D.grid(48, 5.0)[47] * 1000, torch.tensor(96.15), atol=0.01, rtol=0)


# ---------------------------------------------------------------------------------------------
# loss weight


def test_bump_weight_matches_causal_forcing_values():
    # Causal Forcing's training weights (s = 5); its scheduler looks w up at the nearest 1000-grid point
    train_grid = D.grid(1000, 5.0, include_terminal=False)
    causal_forcing = {1000: 0.00, 990: 0.06, 950: 0.32, 900: 0.63, 833: 1.03, 700: 1.67, 500: 2.08,
                      300: 1.67, 100: 0.64, 20: 0.13}
    for t, w in causal_forcing.items():
        sigma = train_grid[(train_grid * 1000 - t).abs().argmin()]
        assert D.loss_weight(sigma, "bump", shift=5.0).item() == pytest.approx(w, abs=0.0051), t
    # min 0 and mean 1 over the training grid
    w_grid = D.loss_weight(train_grid, "bump", shift=5.0)
    assert w_grid.min().item() == pytest.approx(0.0, abs=1e-6)
    assert w_grid.mean().item() == pytest.approx(1.0, abs=1e-4)
    # the normalisation follows the shift the grid is built with
    w3 = D.loss_weight(D.grid(1000, 3.0, include_terminal=False), "bump", shift=3.0)
    assert w3.mean().item() == pytest.approx(1.0, abs=1e-4)


def test_uniform_weight_and_unknown_kind():
    sigma = torch.tensor([[1.0, 0.5, 0.0]])
    torch.testing.assert_close(D.loss_weight(sigma, "uniform"), torch.ones(1, 3))
    with pytest.raises(ValueError, match="kind"):
        D.loss_weight(sigma, "snr")


# ---------------------------------------------------------------------------------------------
# classifier-free guidance


def test_cfg_conventions():
    cond, uncond = torch.randn(2, 3, 4, generator=_gen()), torch.randn(2, 3, 4, generator=_gen(1))
    torch.testing.assert_close(D.cfg_standard(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(D.cfg_standard(cond, uncond, 1.0), cond)
    torch.testing.assert_close(D.cfg_x0_dmd(cond, uncond, 0.0), cond)
    torch.testing.assert_close(D.cfg_x0_dmd(cond, uncond, -1.0), uncond)
    # DMD's g is standard scale 1 + g (g = 3 -> effective 4)
    torch.testing.assert_close(D.cfg_x0_dmd(cond, uncond, 3.0), D.cfg_standard(cond, uncond, 4.0))


def test_standard_cfg_on_velocity_equals_cfg_on_x0():
    g = _gen()
    x = torch.randn(2, 3, 4, generator=g)
    v_c, v_u = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    sigma = torch.tensor([[0.9, 0.5, 0.2], [1.0, 0.7, 0.3]])
    x0_c, x0_u = D.x0_from_velocity(x, v_c, sigma), D.x0_from_velocity(x, v_u, sigma)
    via_v = D.x0_from_velocity(x, D.cfg_standard(v_c, v_u, 2.5), sigma)
    torch.testing.assert_close(D.cfg_standard(x0_c, x0_u, 2.5), via_v)
