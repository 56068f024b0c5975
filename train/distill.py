"""Distillation maths as pure functions: causal CD target, ODE regression, the DMD gradient.

Every function takes tensors and callables and returns tensors, so each can be checked on toy
inputs (tests/test_distill.py). Shapes: latents (B, F, h, w, c); noise levels (B, F) fp32.
The step numbers of causal CD refer to the numbered list in docs/design.md, "Causal consistency
distillation"; the DMD parts are described in its "DMD with self-rollout".
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from worldmodel import diffusion

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma) -> v


def teacher_cfg_euler_step(v_cond: VelocityFn, v_uncond: VelocityFn, x_t: torch.Tensor,
                           sigma_t: torch.Tensor, sigma_s: torch.Tensor, w: float) -> torch.Tensor:
    """One Euler step of the guided teacher ODE from sigma_t to sigma_s (causal CD steps 3-4).

    v_cfg = v_u + w (v_c - v_u) (standard form); x_s = x_t + (sigma_s - sigma_t) v_cfg.
    """
    vc = v_cond(x_t, sigma_t)
    v = vc if w == 1.0 else diffusion.cfg_standard(vc, v_uncond(x_t, sigma_t), w)
    return diffusion.euler_step(x_t, v, sigma_t, sigma_s)


def consistency_target(target_v: VelocityFn, x_s: torch.Tensor, sigma_s: torch.Tensor) -> torch.Tensor:
    """The EMA network's x0 at the later time, f_target(x_s, s) = x_s - sigma_s v (causal CD step 6).

    Where sigma_s = 0 (the terminal pair) the boundary condition f(x, 0) = x gives x_s itself,
    without a network call for those rows.
    """
    terminal = (sigma_s == 0).all(dim=1)  # (B,): one sigma per clip
    if bool(terminal.all()):
        return x_s.float()
    x0 = diffusion.x0_from_velocity(x_s, target_v(x_s, sigma_s), sigma_s)
    return torch.where(terminal[:, None, None, None, None], x_s.float(), x0)


def consistency_loss(student_x0: torch.Tensor, target_x0: torch.Tensor) -> torch.Tensor:
    """Plain MSE in x0 space over (B, F, C, H, W), no weighting (causal CD step 7)."""
    return (student_x0.float() - target_x0.detach().float()).pow(2).mean()


def ode_regression_loss(student_x0: torch.Tensor, ode_endpoint: torch.Tensor) -> torch.Tensor:
    """Causal ODE: regress the x0 prediction onto the stored ODE ENDPOINT, not the next state."""
    return (student_x0.float() - ode_endpoint.float()).pow(2).mean()


def dmd_noise_level(batch: int, shift: float, device: torch.device | str,
                    low: float = 0.02, high: float = 0.98) -> torch.Tensor:
    """sigma = shift(U) clamped to [low, high], one per sample, shape (B, 1).

    The bounds 0.02 / 0.98 are those of Causal Forcing's DMD code (timesteps 20..980 of 1000)."""
    u = torch.rand(batch, 1, device=device)
    return diffusion.shift(u, shift).clamp(low, high).float()


def dmd_gradient(x_hat: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised DMD gradient: (x0_fake - x0_real) / mean_(F,C,H,W) |x_hat - x0_real|.

    The normaliser is per sample; ``mask`` (B, F) bool restricts both the normaliser and the
    gradient to generated frames (real context frames carry no gradient). nan_to_num as in the
    original, so a degenerate sample contributes zero instead of poisoning the batch.
    """
    diff = (x_hat.float() - x0_real.float()).abs()
    if mask is None:
        norm = diff.mean(dim=(1, 2, 3, 4), keepdim=True)
    else:
        m = mask[:, :, None, None, None].float()
        norm = (diff * m).sum(dim=(1, 2, 3, 4), keepdim=True) / (
            m.sum(dim=(1, 2, 3, 4), keepdim=True) * diff[0, 0].numel()).clamp_min(1.0)
    grad = (x0_fake.float() - x0_real.float()) / norm
    if mask is not None:
        grad = grad * mask[:, :, None, None, None]
    return torch.nan_to_num(grad)


def dmd_loss(x_hat: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 * mean((x_hat - sg(x_hat - grad))^2) in float64, so d loss / d x_hat = grad / numel."""
    x = x_hat.double()
    target = (x - grad.double()).detach()
    return 0.5 * (x - target).pow(2).mean()


def critic_flow_loss(v_fake: torch.Tensor, eps: torch.Tensor, x_hat: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Critic (fake score) loss, unweighted flow MSE on generated samples, over ``mask``'s frames."""
    err = (v_fake.float() - (eps - x_hat.detach()).float()).pow(2).mean(dim=(2, 3, 4))  # (B, F)
    if mask is None:
        return err.mean()
    m = mask.float()
    return (err * m).sum() / m.sum().clamp_min(1.0)
