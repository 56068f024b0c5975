"""Stage `teacher`: the bidirectional action-conditioned DiT, trained from scratch.

Flow matching over whole clips with ONE noise level per clip (the teacher denoises all frames
jointly, so it later serves as DMD's real score and the critic's init), and whole-clip action
dropout (the null action) so one network gives both velocities classifier-free guidance on actions
needs. Learning rate, warm-up and betas are a from-scratch recipe: this teacher starts from random
weights, whereas the published Causal Forcing recipes fine-tune a pretrained video model at 2e-6.
See docs/design.md, "Flow-matching stages".

A variant of ours for world models, off by default (``context_frames: 0``): with probability
``context_prob`` a clip's first c frames (c uniform in 1..context_frames) are given clean, at
sigma 0, and only the rest is denoised, as an image-to-video model is conditioned on its first
frame. Causal Forcing's text-to-video teacher has no such frames; a world model always starts
from real ones (play's context, DMD's context rollouts), and a teacher that cannot see them
clean scores a clip without knowing the scene at high noise, where the actions decide the most.
DMD uses this with ``stage.clean_context=true``; the joint evaluation protocol gives such a
teacher its known frames clean instead of by replacement.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tensordict import TensorDict

from train.objectives import AdamWConfig, EMASpec, Logs, Objective, OptimSpec, TrainContext, register
from train.objectives._dit import (StageError, dit_config, drop_actions, flow_matching_loss,
                                   load_dit_weights, save_export, tokenizer_dir)
from worldmodel import diffusion
from worldmodel.dit import DiT


@dataclass
class DiTStageConfig(AdamWConfig):
    lr: float = 3e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    ema_start: int = 0
    shift: float = diffusion.DEFAULT_SHIFT
    loss_weighting: str = "uniform"   # or "bump" (Wan / Causal Forcing's), which is 0 at sigma = 1
    action_dropout: float = 0.1
    num_actions: int = 0              # 0: from the dataset's action names
    clip_len: int = 8                 # = data.clip_len: the DiT's training clip length
    tokenizer: str | None = None      # tokenizer export dir (default: data.tokenizer)
    motion: float = 0.0               # extra weight on latents that move between frames (0 = off;
    motion_threshold: float = 0.5     # see _dit.flow_matching_loss): |latent change| above this moves


@dataclass
class TeacherConfig(DiTStageConfig):
    context_frames: int = 0           # > 0: up to this many leading frames given clean (see above)
    context_prob: float = 0.5         # share of clips that get clean leading frames


def action_names(ctx: TrainContext, num_actions: int) -> list[str]:
    names = ctx.extra.get("action_names")
    if names:
        return list(names)
    if num_actions <= 0:
        raise ValueError("the dataset gave no action names: set stage.num_actions")
    return [f"action{i}" for i in range(num_actions)]


class DiTStage(Objective):
    """Shared body of the transformer stages that train ONE DiT by flow matching."""

    stage_name = "teacher"

    def __init__(self, cfg, ctx: TrainContext) -> None:
        super().__init__(cfg, ctx)
        self.names = action_names(ctx, cfg.num_actions)
        self.tokenizer = tokenizer_dir(cfg, ctx.init_from)
        self.dit = DiT(dit_config(ctx.model, self.tokenizer, len(self.names), cfg.clip_len,
                                  **self.dit_overrides()))
        if ctx.init_from is not None:
            load_dit_weights(self.dit, ctx.init_from)

    def dit_overrides(self) -> dict:
        return {}

    def networks(self) -> dict[str, nn.Module]:
        return {"dit": self.dit}

    def optimizers(self) -> dict[str, OptimSpec]:
        c = self.cfg
        return {"dit": c.adamw("dit", c.lr, ema=(EMASpec("dit", c.ema_decay, c.ema_start),))}

    def noise_levels(self, b: int, t: int) -> torch.Tensor:
        raise NotImplementedError

    def eval_layouts(self) -> dict[str, int]:
        """Validation layouts: metric-name prefix -> number of leading frames given clean."""
        return {"": 0}

    def export_info(self) -> dict:
        return {}

    def flow_loss(self, dit: nn.Module, x0: torch.Tensor, actions: torch.Tensor, sigma: torch.Tensor):
        raise NotImplementedError

    def loss(self, name: str, batch: TensorDict, step: int,
             nets: Mapping[str, nn.Module]) -> tuple[torch.Tensor, Logs]:
        x0 = batch["latents"].float()
        actions = drop_actions(batch["actions"].long(), self.cfg.action_dropout)
        sigma = self.noise_levels(*x0.shape[:2])
        return self.flow_loss(nets["dit"], x0, actions, sigma)

    @torch.no_grad()
    def evaluate(self, step: int, nets: Mapping[str, nn.Module],
                 batches: Iterator[TensorDict]) -> dict[str, float]:
        """Validation loss at fixed noise levels (same batches and noise every time), and how
        much worse it gets with another clip's actions (same frames, same noise): `action_gain`
        near 0 means the model does not use the actions yet, whatever its loss. A batch of one
        clip has no other clip: then only the loss is reported. A context teacher is also scored
        with its leading frames clean (``ctx_`` metrics, over the frames after them)."""
        batch = next(batches)
        x0, actions = batch["latents"].float(), batch["actions"].long()
        others = actions.roll(1, dims=0) if len(actions) > 1 else None
        out = {}
        state = torch.random.get_rng_state()
        for prefix, c in self.eval_layouts().items():
            for i, s in enumerate((0.25, 0.5, 0.75, 1.0)):
                sigma = torch.full(x0.shape[:2], s, device=x0.device)
                sigma[:, :c] = 0.0
                torch.manual_seed(i)
                _, logs = self.flow_loss(nets["dit"], x0, actions, sigma)
                out[f"{prefix}val_mse@{s}"] = logs["flow"].item()   # the plain loss, motion term or not
                if "mse_moving" in logs:
                    out[f"{prefix}val_moving_mse@{s}"] = logs["mse_moving"].item()
                if others is not None:
                    torch.manual_seed(i)
                    _, shuffled = self.flow_loss(nets["dit"], x0, others, sigma)
                    out[f"{prefix}action_gain@{s}"] = shuffled["flow"].item() - logs["flow"].item()
        torch.random.set_rng_state(state)
        return out

    def export(self, out_dir: Path, weights: Mapping[str, dict[str, torch.Tensor]],
               batches: Iterator[TensorDict]) -> None:
        save_export(out_dir, self.dit, weights["dit"], self.names, self.stage_name, self.tokenizer,
                    batches, engine={"sampler": "euler", "steps": 50, "first_frame_steps": 50,
                                     "shift": self.cfg.shift}, info=self.export_info())


@register("teacher")
class TeacherObjective(DiTStage):
    Config = TeacherConfig
    stage_name = "teacher"

    def __init__(self, cfg: TeacherConfig, ctx: TrainContext) -> None:
        if not 0 <= cfg.context_frames < cfg.clip_len:
            raise StageError(f"stage.context_frames={cfg.context_frames} must be in 0..clip_len-1 "
                             f"({cfg.clip_len - 1}): some frames of each clip must be left to denoise")
        super().__init__(cfg, ctx)

    def noise_levels(self, b: int, t: int) -> torch.Tensor:
        # one sigma per clip: the bidirectional teacher denoises a whole clip jointly
        sigma = diffusion.sample_noise_level((b, 1), self.cfg.shift, device=self.ctx.device).expand(b, t)
        if self.cfg.context_frames == 0:
            return sigma
        dev = self.ctx.device
        c = torch.randint(1, self.cfg.context_frames + 1, (b, 1), device=dev)
        c = torch.where(torch.rand(b, 1, device=dev) < self.cfg.context_prob, c, torch.zeros_like(c))
        given = torch.arange(t, device=dev)[None, :] < c     # (B, T): the clip's clean leading frames
        return torch.where(given, torch.zeros_like(sigma), sigma)

    def eval_layouts(self) -> dict[str, int]:
        c = self.cfg.context_frames
        return {"": 0, "ctx_": c} if c else {"": 0}

    def export_info(self) -> dict:
        return {"context_frames": self.cfg.context_frames} if self.cfg.context_frames else {}

    def flow_loss(self, dit, x0, actions, sigma):
        return flow_matching_loss(dit, x0, actions, sigma, self.cfg.loss_weighting, self.cfg.shift,
                                  motion=self.cfg.motion, motion_threshold=self.cfg.motion_threshold)
