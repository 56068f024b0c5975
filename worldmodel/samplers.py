"""Samplers: pure functions with one signature, k-diffusion style.

Every sampler is ``fn(denoise, x, sigmas, *, generator=None, callback=None) -> x0`` where

- ``denoise(x, sigma) -> x0_hat`` is an x0-predictor. ``x`` is the noisy state ``(B, T, ...)``
  (frames along dim 1) and ``sigma`` is a float32 tensor of shape ``(B, T)`` == ``x.shape[:2]`` on
  ``x``'s device, one noise level per frame in [0, 1]; during plain sampling every entry is equal.
  A network that predicts the velocity v is wrapped as ``x - sigma * v`` (``diffusion.x0_from_velocity``).
- ``x`` is the starting state at noise level ``sigmas[0]`` (pure noise ``randn`` when sigmas[0] = 1).
- ``sigmas`` is a 1-D float32 list (tensor or sequence) of strictly decreasing noise levels in
  [0, 1], e.g. ``diffusion.grid(32)`` or ``diffusion.step_list(2)``.
- ``generator`` seeds any fresh noise a sampler draws (it must live on ``x``'s device).
- ``callback(info)`` is called after every step with a dict: ``i`` (step index), ``x`` (state fed
  to the denoiser), ``sigma`` (its level, float), ``sigma_next`` (float), ``denoised`` (x0_hat).

Samplers return the clean sample ``(B, T, ...)``. Conditioning (actions, KV cache) is closed over by
``denoise``; classifier-free guidance is a denoiser wrapper (``cfg_denoiser``), not a sampler option;
the frame-by-frame autoregressive rollout calls a sampler once per frame or block. Samplers do not
change the autograd mode: wrap inference in ``torch.no_grad()``; with grad enabled they are
differentiable end to end (a training rollout can backpropagate through its last step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from worldmodel.diffusion import add_noise, cfg_standard, cfg_x0_dmd, euler_step, velocity_from_x0

__all__ = ["Denoiser", "Callback", "cfg_denoiser", "euler", "heun", "few_step", "SAMPLERS"]

Denoiser = Callable[[Tensor, Tensor], Tensor]
"""denoise(x (B, T, ...), sigma float32 (B, T)) -> x0_hat (B, T, ...)."""

Callback = Callable[[dict[str, Any]], None]
"""callback({"i", "x", "sigma", "sigma_next", "denoised"}) -> None, called after each step."""

CFG_CONVENTIONS = ("standard", "x0_dmd")


def cfg_denoiser(
    denoise_cond: Denoiser, denoise_uncond: Denoiser, scale: float, convention: str = "standard"
) -> Denoiser:
    """Wrap two x0-denoisers into one guided denoiser (classifier-free guidance).

    convention "standard": uncond + scale * (cond - uncond)  (scale 1 = no guidance);
    convention "x0_dmd":   cond + scale * (cond - uncond)    (scale 0 = no guidance; = standard 1 + scale).
    Guiding x0 predictions equals guiding velocities (see ``diffusion.cfg_standard``). When the scale
    means "no guidance" the unconditional denoiser is not called, halving the cost.
    """
    if convention not in CFG_CONVENTIONS:
        raise ValueError(f"unknown CFG convention {convention!r}; expected one of {CFG_CONVENTIONS}")
    combine = cfg_standard if convention == "standard" else cfg_x0_dmd
    no_guidance = 1.0 if convention == "standard" else 0.0

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        cond = denoise_cond(x, sigma)
        if scale == no_guidance:
            return cond
        return combine(cond, denoise_uncond(x, sigma), scale)

    return denoise


def _sigma_list(sigmas: Tensor | Sequence[float]) -> list[float]:
    """Validate a 1-D strictly decreasing noise-level list in [0, 1]; return its float32 values as floats."""
    s = torch.as_tensor(sigmas).detach().to(device="cpu", dtype=torch.float32)
    if s.ndim != 1 or s.numel() == 0:
        raise ValueError(f"sigmas must be a non-empty 1-D list, got shape {tuple(s.shape)}")
    values = s.tolist()
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"sigmas must lie in [0, 1], got {values}")
    if any(a <= b for a, b in zip(values, values[1:])):
        raise ValueError(f"sigmas must be strictly decreasing, got {values}")
    return values


def _level(x: Tensor, value: float) -> Tensor:
    """Per-frame noise level for ``x`` (B, T, ...): float32 (B, T) filled with ``value``."""
    if x.ndim < 2:
        raise ValueError(f"x must have shape (B, T, ...), got {tuple(x.shape)}")
    return torch.full(x.shape[:2], value, dtype=torch.float32, device=x.device)


def _report(
    callback: Callback | None, i: int, x: Tensor, sigma: float, sigma_next: float, x0: Tensor
) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": x0})


def euler(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler on the PF-ODE dx/dsigma = v, v = (x - x0_hat)/sigma, from sigmas[0] to 0 (Karras et al. 2022).

    A 0 is appended when ``sigmas`` does not end at 0, so N levels give N denoiser calls.
    x: (B, T, ...) at level sigmas[0]. Deterministic: ``generator`` is accepted for the common
    signature and unused. Returns x0 (B, T, ...).
    """
    levels = _sigma_list(sigmas)
    if levels[-1] != 0.0:
        levels.append(0.0)
    for i, (s, s_next) in enumerate(zip(levels, levels[1:])):
        sigma = _level(x, s)
        x0_hat = denoise(x, sigma)
        _report(callback, i, x, s, s_next, x0_hat)
        if s_next == 0.0:
            # x + (0 - s) * (x - x0_hat) / s is x0_hat exactly; skip the division's rounding
            x = x0_hat
        else:
            x = euler_step(x, velocity_from_x0(x, x0_hat, sigma), sigma, _level(x, s_next))
    return x


def heun(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Heun (2nd order) on the PF-ODE (Karras et al. 2022, Alg. 1); the step into sigma = 0 is Euler.

    A 0 is appended when ``sigmas`` does not end at 0; N levels cost 2N - 1 denoiser calls.
    x: (B, T, ...) at level sigmas[0]. Deterministic; ``generator`` is unused. Returns x0 (B, T, ...).
    """
    levels = _sigma_list(sigmas)
    if levels[-1] != 0.0:
        levels.append(0.0)
    for i, (s, s_next) in enumerate(zip(levels, levels[1:])):
        sigma = _level(x, s)
        x0_hat = denoise(x, sigma)
        _report(callback, i, x, s, s_next, x0_hat)
        if s_next == 0.0:
            x = x0_hat  # the ODE's last segment: a second evaluation at sigma = 0 is undefined
            continue
        sigma_next = _level(x, s_next)
        v = velocity_from_x0(x, x0_hat, sigma)
        x_pred = euler_step(x, v, sigma, sigma_next)
        v_next = velocity_from_x0(x_pred, denoise(x_pred, sigma_next), sigma_next)
        x = euler_step(x, (v + v_next) / 2, sigma, sigma_next)  # trapezoid rule
    return x


def few_step(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Consistency-style multistep sampler: x0_hat = denoise(x, sigma_k), re-noise to sigma_{k+1}, repeat.

    For k = 0..K-1: x0_hat = denoise(x, sigma_k); if k < K-1: x = (1 - sigma_{k+1}) x0_hat +
    sigma_{k+1} eps with fresh eps ~ N(0, I) drawn from ``generator`` (one ``randn(x.shape)`` per
    re-noise); the last step returns x0_hat. Use with ``diffusion.step_list(K)``; a trailing 0 in
    ``sigmas`` is ignored (the last denoise already returns x0). x: (B, T, ...) at level sigmas[0].
    Returns x0 (B, T, ...).
    """
    levels = _sigma_list(sigmas)
    if levels[-1] == 0.0:
        levels.pop()
    for i, s in enumerate(levels):
        s_next = levels[i + 1] if i + 1 < len(levels) else 0.0
        x0_hat = denoise(x, _level(x, s))
        _report(callback, i, x, s, s_next, x0_hat)
        if s_next == 0.0:
            return x0_hat
        eps = torch.randn(x0_hat.shape, generator=generator, device=x0_hat.device, dtype=x0_hat.dtype)
        x = add_noise(x0_hat, eps, _level(x0_hat, s_next))
    return x  # only reached when sigmas was [0]: x is already clean


SAMPLERS: dict[str, Callable[..., Tensor]] = {"euler": euler, "heun": heun, "few_step": few_step}
"""Samplers by name, for selection from a config."""
