"""Self-rollout of the causal generator through its KV cache, for DMD (Self Forcing style; see
docs/design.md, "DMD with self-rollout").

Block by block: fresh noise; the few-step sampler (predict x0, re-noise it to the step list's next
level, as ``samplers.few_step``) runs WITHOUT grad up to a random exit step, the exit step runs
WITH grad and its x0 prediction is the block's output (so every step of the sampler gets trained);
then the block's detached x0 is written into the cache at sigma = 0 without grad (truncated
gradient: nothing flows into later blocks through the cache; the cached x0 is not re-noised to a
small level such as sigma = 0.005, and the public Causal Forcing code also caches at zero noise).
The noise is drawn in exactly the order ``worldmodel.engine.Engine`` draws it, so with the exit at
the last step and the same generator state the rollout IS the engine's output
(tests/test_rollout.py).
"""

from __future__ import annotations

import torch

from worldmodel import diffusion
from worldmodel.dit import DiT


def unwrap(net: torch.nn.Module) -> DiT:
    """The DiT inside a DDP/FSDP wrapper (or the DiT itself)."""
    return getattr(net, "module", net)


def self_rollout(net: torch.nn.Module, actions: torch.Tensor, step_list: torch.Tensor,
                 first_list: torch.Tensor, exit_step: int, first_exit: int,
                 rng: torch.Generator | None = None, context: torch.Tensor | None = None,
                 grad: bool = True) -> torch.Tensor:
    """Generate the latents of a clip autoregressively.

    net: the causal generator (possibly DDP-wrapped; called through ``forward(..., cache=)`` so
    DDP sees the gradient-carrying calls). actions (B, F); frames ``0 .. c-1`` are ``context``
    (B, c, h, w, c) real latents when given, otherwise block 0 starts from noise with
    ``first_list`` and exits at ``first_exit``. Later blocks use ``step_list`` and ``exit_step``.
    Returns x_hat (B, F, h, w, c) fp32: context frames as given, generated frames with grad
    through their exit step only (when ``grad``).
    """
    dit = unwrap(net)
    cfg = dit.cfg
    b, f = actions.shape
    k = cfg.frames_per_block
    if f % k:
        raise ValueError(f"rollout length {f} is not a multiple of the block size {k}")
    cache = dit.new_cache(b, window=f - k, sink=0, device=actions.device, dtype=torch.float32
                          if dit.patch_in.weight.dtype == torch.float32 else dit.patch_in.weight.dtype)
    out: list[torch.Tensor] = []
    start = 0
    if context is not None and context.shape[1]:
        c = context.shape[1]
        if c % k:
            raise ValueError(f"context of {c} frames is not a multiple of the block size {k}")
        for s in range(0, c, k):
            dit.refresh(context[:, s:s + k], actions[:, s:s + k], cache)
        out.append(context.float())
        start = c
    shape = (b, k, cfg.latent_size, cfg.latent_size, cfg.latent_channels)
    for s in range(start, f, k):
        acts = actions[:, s:s + k]
        first = cache.counts[0] == 0
        sigmas, exit_at = (first_list, first_exit) if first else (step_list, exit_step)
        x = torch.randn(shape, generator=rng, device=actions.device)
        x0 = x
        for i in range(exit_at + 1):
            sigma = torch.full((b, k), float(sigmas[i]), device=actions.device)
            with torch.set_grad_enabled(grad and i == exit_at):
                v = net(x, sigma, acts, cache=cache)
                x0 = diffusion.x0_from_velocity(x, v, sigma)
            if i < exit_at:
                eps = torch.randn(shape, generator=rng, device=actions.device)
                x = diffusion.add_noise(x0, eps, float(sigmas[i + 1]))
        out.append(x0)
        dit.refresh(x0.detach(), acts, cache)
    return torch.cat(out, dim=1)
