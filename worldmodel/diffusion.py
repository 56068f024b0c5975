"""Rectified-flow diffusion parameterisation, separate from any network.

Everything here is a pure function of tensors. Notation (docs/CONVENTIONS.md):

- ``sigma`` (a.k.a. ``noise_level``): float32 ``(B, T)`` in [0, 1], one value per frame;
  sigma = 1 is pure noise, sigma = 0 is clean data. The network is fed ``t = 1000 * sigma``.
- Forward process:  x_sigma = (1 - sigma) * x0 + sigma * eps,  eps ~ N(0, I).
- Velocity target:  v = eps - x0 = d x_sigma / d sigma, so  x0 = x_sigma - sigma * v.
- Sampling integrates the probability-flow ODE  dx/dsigma = v  from sigma = 1 down to 0.

Precision: noise levels are always float32. Every function casts ``sigma`` to float32 before use and
its tensor results are at least float32 (PyTorch type promotion against the fp32 sigma), so a bf16
backbone output never drags the schedule arithmetic down to bf16. Known pitfall: building timesteps
in bf16 rounds t to a spacing of 4 for t in [512, 1024), which silently changes both what the network
sees and the Euler step size; keep sigma and t in fp32 and let only the backbone run in bf16.

Data tensors ``x`` have shape ``(B, T, ...)`` (frames along dim 1, e.g. latents ``(B, T, h, w, c)``);
``sigma`` of shape ``(B, T)`` (or anything of lower rank that broadcasts, e.g. ``(B, 1)`` or a scalar)
is broadcast per frame over the trailing dimensions.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_SHIFT",
    "TIMESTEP_SCALE",
    "STEP_COUNTS",
    "FIRST_FRAME_NUM_STEPS",
    "shift",
    "inverse_shift",
    "timestep",
    "sample_noise_level",
    "sample_block_noise_level",
    "add_noise",
    "velocity_target",
    "x0_from_velocity",
    "velocity_from_x0",
    "euler_step",
    "step_list",
    "first_frame_steps",
    "grid",
    "loss_weight",
    "cfg_standard",
    "cfg_x0_dmd",
]

DEFAULT_SHIFT = 3.0
"""Timestep shift s for 64x64 frames; low resolution needs less shift than the 5.0 used at 480p."""

TIMESTEP_SCALE = 1000.0
"""The network sees t = TIMESTEP_SCALE * sigma."""

STEP_COUNTS = (1, 2, 4)
"""Few-step list lengths the distilled generator is trained for."""

FIRST_FRAME_NUM_STEPS = 4
"""The first frame (no context yet) is generated with the 4-step list, later frames with 1 or 2 steps."""

_TRAIN_GRID_POINTS = 1000  # the bump weight is normalised over this many training-grid points


def _fp32(sigma: Tensor | float, like: Tensor | None = None) -> Tensor:
    """Noise level as a float32 tensor on ``like``'s device (on its own device if no ``like``)."""
    device = like.device if like is not None else None
    if isinstance(sigma, Tensor):
        return sigma.to(device=device if device is not None else sigma.device, dtype=torch.float32)
    return torch.tensor(float(sigma), dtype=torch.float32, device=device)


def _per_frame(sigma: Tensor | float, x: Tensor) -> Tensor:
    """float32 ``sigma`` (B, T) viewed as (B, T, 1, ..., 1), to broadcast against ``x`` (B, T, ...)."""
    s = _fp32(sigma, like=x)
    if s.ndim > x.ndim:
        raise ValueError(f"sigma has shape {tuple(s.shape)}, more dims than x {tuple(x.shape)}")
    # trailing singleton dims: sigma indexes the leading (batch, frame) dims of x
    return s.reshape(*s.shape, *([1] * (x.ndim - s.ndim)))


# ---------------------------------------------------------------------------------------------
# timestep shift


def shift(u: Tensor | float, s: float) -> Tensor | float:
    """Timestep shift sigma = s*u / (1 + (s-1)*u); maps [0, 1] onto [0, 1], s > 1 pushes mass to high noise.

    u: tensor (any shape) or float in [0, 1]. Tensors come back float32, floats stay floats.
    """
    if s <= 0:
        raise ValueError(f"shift s must be > 0, got {s}")
    if isinstance(u, Tensor):
        u = u.to(torch.float32)
    return s * u / (1 + (s - 1) * u)


def inverse_shift(sigma: Tensor | float, s: float) -> Tensor | float:
    """Inverse of ``shift``: u = sigma / (s - (s-1)*sigma).

    sigma: tensor (any shape) or float in [0, 1]. Tensors come back float32, floats stay floats.
    """
    if s <= 0:
        raise ValueError(f"shift s must be > 0, got {s}")
    if isinstance(sigma, Tensor):
        sigma = sigma.to(torch.float32)
    return sigma / (s - (s - 1) * sigma)


_shift = shift  # functions below take a parameter named ``shift`` (the value s); this keeps the function


def timestep(sigma: Tensor) -> Tensor:
    """Network timestep t = 1000 * sigma, float32, same shape as ``sigma``."""
    return _fp32(sigma) * TIMESTEP_SCALE


# ---------------------------------------------------------------------------------------------
# noise-level sampling for training


def sample_noise_level(
    shape: tuple[int, ...] | torch.Size,
    shift: float = DEFAULT_SHIFT,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    *,
    clamp: tuple[float, float] | None = None,
) -> Tensor:
    """sigma = shift(U), U ~ Uniform(0, 1]: the continuous limit of drawing a training-grid index uniformly.

    Returns float32 ``shape`` (usually (B, T): an independent level per frame, diffusion-forcing
    style; use (B, 1) for one level per clip) in (0, 1]. ``clamp=(lo, hi)`` clips the result, as the
    DMD loss does with (0.02, 0.98). The generator must live on ``device``.
    """
    # 1 - rand is in (0, 1]: like the training grid it includes pure noise and excludes sigma = 0,
    # where the velocity/x0 conversion is singular.
    u = 1.0 - torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    sigma = _shift(u, shift)
    if clamp is not None:
        sigma = sigma.clamp(clamp[0], clamp[1])
    return sigma


def sample_block_noise_level(
    shape: tuple[int, ...] | torch.Size,
    shift: float = DEFAULT_SHIFT,
    frames_per_block: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    *,
    clamp: tuple[float, float] | None = None,
) -> Tensor:
    """Like ``sample_noise_level`` but frames of one block share sigma (blocks of ``frames_per_block``).

    shape: (..., T); blocks run along the last dim, starting at frame 0; if T is not a multiple of
    ``frames_per_block`` the last block is shorter. Returns float32 ``shape`` in (0, 1].
    """
    if frames_per_block < 1:
        raise ValueError(f"frames_per_block must be >= 1, got {frames_per_block}")
    *lead, num_frames = shape
    num_blocks = math.ceil(num_frames / frames_per_block)
    per_block = sample_noise_level(
        (*lead, num_blocks), shift, generator=generator, device=device, clamp=clamp
    )  # (..., num_blocks)
    return per_block.repeat_interleave(frames_per_block, dim=-1)[..., :num_frames]  # (..., T)


# ---------------------------------------------------------------------------------------------
# forward process and prediction-target conversions


def add_noise(x0: Tensor, eps: Tensor, sigma: Tensor | float) -> Tensor:
    """x_sigma = (1 - sigma) * x0 + sigma * eps (rectified-flow forward process).

    x0, eps: (B, T, ...); sigma: (B, T) in [0, 1], broadcast per frame. Returns (B, T, ...).
    """
    s = _per_frame(sigma, x0)
    return (1 - s) * x0 + s * eps


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    """Flow-matching target v = eps - x0 = d x_sigma / d sigma. Shapes (B, T, ...)."""
    return eps - x0


def x0_from_velocity(x: Tensor, v: Tensor, sigma: Tensor | float) -> Tensor:
    """x0 = x_sigma - sigma * v (the network's velocity as a clean-data prediction).

    x, v: (B, T, ...); sigma: (B, T) in [0, 1], broadcast per frame. Returns (B, T, ...).
    """
    return x - _per_frame(sigma, x) * v


def velocity_from_x0(x: Tensor, x0: Tensor, sigma: Tensor | float) -> Tensor:
    """v = (x_sigma - x0) / sigma, the inverse of ``x0_from_velocity``; undefined at sigma = 0.

    x, x0: (B, T, ...); sigma: (B, T) in (0, 1], broadcast per frame. Returns (B, T, ...).
    """
    # no clamp: dividing by a tiny sigma is the caller's bug and should show up as inf, not be hidden
    return (x - x0) / _per_frame(sigma, x)


def euler_step(x: Tensor, v: Tensor, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
    """One Euler step of the PF-ODE dx/dsigma = v: x' = x + (sigma_next - sigma) * v.

    x, v: (B, T, ...); sigma, sigma_next: (B, T) in [0, 1] (sigma_next < sigma when sampling).
    """
    return x + (_per_frame(sigma_next, x) - _per_frame(sigma, x)) * v


# ---------------------------------------------------------------------------------------------
# inference step lists and the N-point grid


def step_list(
    num_steps: int, shift: float = DEFAULT_SHIFT, device: torch.device | str | None = None
) -> Tensor:
    """Warped few-step list sigma_k = shift(1 - k/K), k = 0..K-1, for K in {1, 2, 4}; no trailing 0.

    Equals the warped lists [1000, 750, 500, 250] / [1000, 500] / [1000] (t = 1000*shift(k/1000)).
    With s = 5: [1, .9375, .8333, .625], [1, .8333], [1]; with s = 3: [1, .9, .75, .5], [1, .75], [1].
    Returns float32 (K,), strictly decreasing, in (0, 1].
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps not in STEP_COUNTS:
        raise ValueError(
            f"num_steps must be one of {STEP_COUNTS} (the step counts the generator is distilled for), "
            f"got {num_steps!r}"
        )
    # float64 arithmetic in Python, one rounding to float32 at the end
    values = [_shift(1.0 - k / num_steps, shift) for k in range(num_steps)]
    return torch.tensor(values, dtype=torch.float32, device=device)


def first_frame_steps(shift: float = DEFAULT_SHIFT, device: torch.device | str | None = None) -> Tensor:
    """Step list for the first frame of a rollout: the 4-step list (more steps where there is no context).

    Returns float32 (4,), the same as ``step_list(4, shift)``.
    """
    return step_list(FIRST_FRAME_NUM_STEPS, shift, device=device)


def grid(
    N: int,
    shift: float = DEFAULT_SHIFT,
    include_terminal: bool = True,
    device: torch.device | str | None = None,
) -> Tensor:
    """N-point grid sigma_n = shift(1 - n/N), n = 0..N-1, plus sigma_N = 0 if ``include_terminal``.

    Used for ODE trajectories, consistency-distillation pairs (sigma_n, sigma_{n+1}) and Euler
    sampling. Returns float32 (N + 1,) or (N,), strictly decreasing, from 1 down to 0 (or shift(1/N)).
    """
    if isinstance(N, bool) or not isinstance(N, int) or N < 1:
        raise ValueError(f"grid size N must be a positive int, got {N!r}")
    values = [_shift(1.0 - n / N, shift) for n in range(N)]
    if include_terminal:
        values.append(0.0)
    return torch.tensor(values, dtype=torch.float32, device=device)


# ---------------------------------------------------------------------------------------------
# loss weighting


def loss_weight(sigma: Tensor, kind: str = "uniform", shift: float = DEFAULT_SHIFT) -> Tensor:
    """Per-frame flow-loss weight w(sigma); "uniform" = 1, "bump" = exp(-2((t-500)/1000)^2) normalised.

    "bump": y(t) with t = 1000*sigma, shifted so that its minimum over the 1000-point training grid
    t_j = 1000*shift(1 - j/1000), j = 0..999, is 0 and rescaled so that its mean over that grid is 1
    (the normalisation therefore depends on ``shift``). w(sigma = 1) = 0: the bump does not train pure
    noise at all, which is where 1- and 2-step students start; prefer "uniform" for that reason.
    sigma: float32 (B, T) in [0, 1]. Returns float32, same shape.
    """
    s = _fp32(sigma)
    if kind == "uniform":
        return torch.ones_like(s)
    if kind == "bump":
        y_min, y_mean = _bump_normalisation(float(shift))
        return (_bump(s * TIMESTEP_SCALE) - y_min) / y_mean
    raise ValueError(f"unknown loss-weight kind {kind!r}; expected 'uniform' or 'bump'")


@functools.lru_cache(maxsize=8)
def _bump_normalisation(shift: float) -> tuple[float, float]:
    """(min, mean - min) of the bump over the 1000-point training grid, computed once per shift in float64."""
    u = 1.0 - torch.arange(_TRAIN_GRID_POINTS, dtype=torch.float64) / _TRAIN_GRID_POINTS
    grid_y = _bump(TIMESTEP_SCALE * (shift * u / (1 + (shift - 1) * u)))
    y_min = grid_y.min().item()
    return y_min, (grid_y - y_min).mean().item()


def _bump(t: Tensor) -> Tensor:
    """y(t) = exp(-2 ((t - 500) / 1000)^2), the un-normalised bell over timesteps t in [0, 1000]."""
    half = TIMESTEP_SCALE / 2
    return torch.exp(-2 * ((t - half) / TIMESTEP_SCALE) ** 2)


# ---------------------------------------------------------------------------------------------
# classifier-free guidance (two conventions; see cfg_x0_dmd)


def cfg_standard(cond: Tensor, uncond: Tensor, w: float) -> Tensor:
    """Standard CFG: uncond + w * (cond - uncond); w = 0 -> uncond, w = 1 -> cond (no guidance).

    Used by teacher sampling, ODE-trajectory generation and consistency distillation. Because the
    weights (1 - w, w) sum to 1 it commutes with the affine x0 <-> v maps: guiding velocities or x0
    predictions of the same x_sigma gives the same result. cond, uncond: same shape.
    """
    return uncond + w * (cond - uncond)


def cfg_x0_dmd(cond: Tensor, uncond: Tensor, g: float) -> Tensor:
    """DMD-style CFG on x0: cond + g * (cond - uncond) = cfg_standard(cond, uncond, 1 + g).

    The DMD real score uses this form, so its g = 3 is a standard scale of 4; g = 0 -> cond.
    cond, uncond: same shape.
    """
    return cond + g * (cond - uncond)
