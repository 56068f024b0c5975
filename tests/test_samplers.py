"""Behaviour of the samplers in worldmodel.samplers against denoisers with known answers."""

import pytest
import torch

from worldmodel import diffusion as D
from worldmodel.samplers import SAMPLERS, cfg_denoiser, euler, few_step, heun


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _oracle(x0: torch.Tensor):
    """Denoiser that always knows the clean sample (a point-mass data distribution)."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        assert sigma.shape == x.shape[:2] and sigma.dtype == torch.float32
        return x0.clone()

    return denoise


def _gaussian_denoiser(mu: float, std: float):
    """Exact E[x0 | x_sigma] for data x0 ~ N(mu, std^2) i.i.d. per coordinate."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.reshape(*sigma.shape, *([1] * (x.ndim - sigma.ndim))).double()
        a = 1 - s  # x = a * x0 + s * eps  ->  x ~ N(a mu, a^2 std^2 + s^2)
        gain = a * std**2 / (a**2 * std**2 + s**2)
        return mu + gain * (x - a * mu)

    return denoise


# ---------------------------------------------------------------------------------------------
# few-step sampler


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_few_step_with_oracle_returns_x0(num_steps):
    x0 = torch.randn(2, 3, 4, generator=_gen())
    noise = torch.randn(2, 3, 4, generator=_gen(1))
    out = few_step(_oracle(x0), noise, D.step_list(num_steps), generator=_gen(2))
    assert torch.equal(out, x0)


def test_few_step_renoises_with_fresh_generator_noise():
    x0 = torch.randn(2, 1, 64, generator=_gen())
    sigmas = D.step_list(4, 5.0)
    seen = []
    out = few_step(_oracle(x0), torch.randn(2, 1, 64, generator=_gen(1)), sigmas, generator=_gen(9),
                   callback=seen.append)
    assert torch.equal(out, x0)
    assert [c["i"] for c in seen] == [0, 1, 2, 3]
    assert [c["sigma"] for c in seen] == pytest.approx(sigmas.tolist())
    assert [c["sigma_next"] for c in seen] == pytest.approx(sigmas.tolist()[1:] + [0.0])
    # the state fed at step k+1 is (1 - sigma) x0_hat + sigma eps with eps = the generator's next randn
    replay = _gen(9)
    for c in seen[1:]:
        eps = (c["x"] - (1 - c["sigma"]) * x0) / c["sigma"]
        torch.testing.assert_close(eps, torch.randn(2, 1, 64, generator=replay), atol=1e-5, rtol=1e-5)
    # a trailing 0 in the list changes nothing; the same seed gives the same draws
    seen_zero = []
    few_step(_oracle(x0), seen[0]["x"], torch.cat([sigmas, torch.zeros(1)]), generator=_gen(9),
             callback=seen_zero.append)
    assert len(seen_zero) == 4 and torch.equal(seen_zero[3]["x"], seen[3]["x"])


# ---------------------------------------------------------------------------------------------
# Euler and Heun on the PF-ODE


@pytest.mark.parametrize("sampler", [euler, heun])
@pytest.mark.parametrize("num_levels", [1, 2, 5, 33])
def test_ode_samplers_with_point_mass_return_the_point(sampler, num_levels):
    x0 = torch.randn(2, 3, 4, generator=_gen())
    sigmas = D.grid(num_levels - 1, 3.0) if num_levels > 1 else torch.tensor([1.0])
    out = sampler(_oracle(x0), torch.randn(2, 3, 4, generator=_gen(1)), sigmas)
    torch.testing.assert_close(out, x0)


def test_euler_appends_terminal_zero_and_follows_straight_paths():
    # with a point-mass oracle every Euler step lands exactly on the straight noise-to-data line
    x0 = torch.randn(1, 2, 3, generator=_gen())
    eps = torch.randn(1, 2, 3, generator=_gen(1))
    sigmas = D.grid(8, 3.0, include_terminal=False)
    seen = []
    euler(_oracle(x0), eps, sigmas, callback=seen.append)
    assert len(seen) == 8 and seen[-1]["sigma_next"] == 0.0
    for c in seen:
        torch.testing.assert_close(c["x"], D.add_noise(x0, eps, c["sigma"]), atol=1e-5, rtol=1e-5)


def test_euler_on_gaussian_data_reaches_the_analytic_map():
    # For x0 ~ N(mu, std^2) the PF-ODE from sigma = 1 maps noise z to mu + std * z exactly.
    mu, std = 1.5, 0.5
    z = torch.randn(4096, 1, 2, generator=_gen(), dtype=torch.float64)
    denoise = _gaussian_denoiser(mu, std)
    err = {n: (euler(denoise, z, D.grid(n, 3.0)) - (mu + std * z)).abs().max().item() for n in (200, 400)}
    assert err[400] < 0.02
    assert 0.4 < err[400] / err[200] < 0.6  # first-order convergence to the analytic map
    out = euler(denoise, z, D.grid(400, 3.0))
    assert out.mean().item() == pytest.approx(mu + std * z.mean().item(), abs=1e-3)
    assert out.mean().item() == pytest.approx(mu, abs=0.03)
    assert out.std().item() == pytest.approx(std, rel=0.05)


def test_heun_is_second_order_and_beats_euler():
    mu, std = -0.5, 0.3
    z = torch.randn(512, 1, 2, generator=_gen(), dtype=torch.float64)
    target = mu + std * z
    denoise = _gaussian_denoiser(mu, std)
    sigmas = D.grid(20, 1.0)
    err_euler = (euler(denoise, z, sigmas) - target).abs().max()
    err_heun = (heun(denoise, z, sigmas) - target).abs().max()
    assert err_heun < err_euler / 5
    err_heun_2x = (heun(denoise, z, D.grid(40, 1.0)) - target).abs().max()
    assert 0.15 < err_heun_2x / err_heun < 0.35  # error ~ h^2


def test_sigma_list_validation():
    x = torch.zeros(1, 1, 2)
    for bad in ([1.0, 1.0, 0.5], [0.5, 0.9], [1.5, 0.5], [], [[1.0, 0.5]]):
        with pytest.raises(ValueError):
            euler(_oracle(x), x, torch.tensor(bad))
    with pytest.raises(ValueError):
        few_step(_oracle(x), torch.zeros(2), [1.0])  # x must be (B, T, ...)


def test_samplers_share_one_signature():
    x0 = torch.randn(1, 2, 3, generator=_gen())
    for name, fn in SAMPLERS.items():
        out = fn(_oracle(x0), torch.randn(1, 2, 3, generator=_gen(1)), [1.0, 0.5],
                 generator=_gen(2), callback=None)
        torch.testing.assert_close(out, x0, msg=name)


# ---------------------------------------------------------------------------------------------
# classifier-free guidance wrapper


def test_cfg_denoiser_conventions_and_no_guidance_shortcut():
    x = torch.randn(1, 2, 3, generator=_gen())
    sigma = torch.full((1, 2), 0.5)
    cond_x0, uncond_x0 = torch.ones(1, 2, 3), torch.zeros(1, 2, 3)
    calls = {"uncond": 0}

    def cond(x, s):
        return cond_x0

    def uncond(x, s):
        calls["uncond"] += 1
        return uncond_x0

    torch.testing.assert_close(cfg_denoiser(cond, uncond, 0.0)(x, sigma), uncond_x0)
    torch.testing.assert_close(cfg_denoiser(cond, uncond, 1.0)(x, sigma), cond_x0)
    torch.testing.assert_close(cfg_denoiser(cond, uncond, 3.0)(x, sigma), torch.full((1, 2, 3), 3.0))
    torch.testing.assert_close(cfg_denoiser(cond, uncond, 0.0, "x0_dmd")(x, sigma), cond_x0)
    dmd = cfg_denoiser(cond, uncond, 3.0, "x0_dmd")
    torch.testing.assert_close(dmd(x, sigma), torch.full((1, 2, 3), 4.0))
    calls["uncond"] = 0
    cfg_denoiser(cond, uncond, 1.0)(x, sigma)
    cfg_denoiser(cond, uncond, 0.0, "x0_dmd")(x, sigma)
    assert calls["uncond"] == 0  # no guidance -> the unconditional pass is skipped
    with pytest.raises(ValueError):
        cfg_denoiser(cond, uncond, 2.0, "v_space")


def test_guided_euler_with_oracles_interpolates_the_points():
    # CFG composes with any sampler: guiding two point-mass oracles lands on the extrapolated point
    a, b = torch.randn(1, 1, 4, generator=_gen()), torch.randn(1, 1, 4, generator=_gen(1))
    guided = cfg_denoiser(_oracle(a), _oracle(b), 2.0)
    out = euler(guided, torch.randn(1, 1, 4, generator=_gen(2)), D.grid(4, 3.0))
    torch.testing.assert_close(out, b + 2.0 * (a - b))
