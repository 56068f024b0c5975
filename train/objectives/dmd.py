"""Stage `dmd`: asymmetric distribution matching distillation with self-rollout, the last stage of
Causal Forcing: DMD with a bidirectional teacher and a causal student that is rolled out through
its own cache as in Self Forcing (details in docs/design.md, "DMD with self-rollout").

Generator: the causal few-step student (init from `causal_cd` or `causal_ode`), rolled out
through its own KV cache (train/self_rollout.py): frame-wise with the 1- or 2-step list, a block
started from noise with the 4-step list, a random exit step shared by the blocks (block 0 has its
own), gradient only through each block's exit forward. Real score: the frozen BIDIRECTIONAL
teacher with action CFG in the x0 form (x0_c + g (x0_c - x0_u)). Fake score: a trainable
bidirectional critic initialised from the teacher. Schedule: the generator updates every
``critic_ratio``-th step (before that step's critic update), the critic every step. EMA of the
generator from ``ema_start``; the export holds the EMA weights. Chunk-wise 4-step is
``steps: 4`` + ``frames_per_block: 3`` of the same code.

World-model adaptation (the original is text-to-video): the "prompt" is the clip's
recorded action sequence; with probability ``context_prob`` the rollout starts from
``context_frames`` real frames in the cache (how play starts), otherwise from noise (the
first-frame list path). Context frames are real: they get no gradient and are excluded from
the DMD normaliser and the critic loss.

Two variants of ours (not Causal Forcing's), for worlds where a clip's motion already reveals its
actions, so the bidirectional teacher barely uses them (measured on Doom: action gain ~10x below
the ar model's) and its CFG pushes little toward the pressed keys:

* ``real_score: ar`` takes both scores from the causal teacher-forcing model: each frame's score
  is conditioned on the rollout's own earlier frames (``clean=x_hat``, the layout the ar stage
  trained on), so DMD matches the per-frame conditionals p(x_i | x_<i, a), not the whole clip's.
  A static past makes a static next frame likely under these conditionals, so this variant can
  settle into stillness (measured on Doom: it follows the keys better but freezes over 1,000
  frames);
* ``real_score: teacher_ar_guidance`` keeps Causal Forcing's teacher and critic but takes the
  guidance direction from the ar model: x0_T(c) + g (x0_ar(c) - x0_ar(null)), so the clip-level
  distribution still comes from the bidirectional teacher and the push toward the keys from the
  model that uses them.

And one for any real score that is the bidirectional teacher: ``clean_context: true`` gives the
real score and the critic the rollout's real context frames clean (sigma 0, not noised with the
rest), so both score p(clip | its real start, actions), the distribution play samples from. It
needs a context teacher (train/objectives/teacher.py, ``stage.context_frames`` >= this stage's
``context_frames``); the critic, initialised from it, trains on the same layout.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tensordict import TensorDict

from train.distill import critic_flow_loss, dmd_gradient, dmd_loss, dmd_noise_level
from train.objectives import AdamWConfig, EMASpec, Logs, Objective, OptimSpec, TrainContext, register
from train.objectives._dit import StageError, read_export, save_export, tokenizer_dir
from train.objectives.causal_cd import dit_from_export
from train.self_rollout import self_rollout
from worldmodel import diffusion


@dataclass
class DMDConfig(AdamWConfig):
    steps: int = 2                  # denoising steps of the student (1, 2 or 4)
    frames_per_block: int = 1       # 1 frame-wise; 3 = the chunk-wise baseline
    teacher: str | None = None      # bidirectional teacher export (real score, critic init)
    real_score: str = "teacher"     # "teacher" (Causal Forcing), "ar" or "teacher_ar_guidance": see above
    ar: str | None = None           # the ar export, for the two ar variants
    lr_generator: float = 1e-5
    lr_critic: float = 2e-6
    betas: tuple[float, float] = (0.0, 0.999)
    grad_clip: float | None = 10.0
    critic_ratio: int = 5           # critic updates per generator update
    guidance: float = 2.0           # real-score CFG, x0 form (effective standard scale 1 + g)
    ema_decay: float = 0.99
    ema_start: int = 200
    shift: float = diffusion.DEFAULT_SHIFT
    context_frames: int = 1
    context_prob: float = 0.5
    clean_context: bool = False     # scores see context frames clean: needs a context teacher
    tokenizer: str | None = None


REAL_SCORES = ("teacher", "ar", "teacher_ar_guidance")


def check_export(option: str, path: str | None, stage: str, variant: str) -> None:
    if not path or read_export(Path(path)).get("stage") != stage:
        raise StageError(f"{option}={path} is not a{'n' if stage == 'ar' else ''} {stage} export "
                         f"(stage.real_score={variant})")


@register("dmd")
class DMDObjective(Objective):
    Config = DMDConfig

    def __init__(self, cfg: DMDConfig, ctx: TrainContext) -> None:
        super().__init__(cfg, ctx)
        if ctx.init_from is None:
            raise StageError("stage dmd needs init_from=<causal_cd or causal_ode export>")
        meta = read_export(ctx.init_from)
        if meta.get("stage") not in ("causal_cd", "causal_ode", "ar", "dmd"):
            raise StageError(f"{ctx.init_from} is a {meta.get('stage')!r} export; dmd starts from a "
                             "causal student (causal_cd or causal_ode)")
        if cfg.real_score not in REAL_SCORES:
            raise StageError(f"stage.real_score={cfg.real_score!r}: use one of {REAL_SCORES}")
        self.causal_score = cfg.real_score == "ar"
        score_dir = cfg.ar if self.causal_score else cfg.teacher
        check_export("stage.ar" if self.causal_score else "stage.teacher", score_dir,
                     "ar" if self.causal_score else "teacher", cfg.real_score)
        if cfg.real_score == "teacher_ar_guidance":
            check_export("stage.ar", cfg.ar, "ar", cfg.real_score)
        if cfg.context_frames % cfg.frames_per_block:
            raise StageError("context_frames must be a multiple of frames_per_block")
        if cfg.clean_context:
            if self.causal_score:
                raise StageError("stage.clean_context=true is for a bidirectional real score; the ar "
                                 "scores already see the rollout's frames clean (stage.real_score=ar)")
            trained = int(read_export(Path(score_dir)).get("context_frames", 0))
            if trained < cfg.context_frames:
                raise StageError(f"stage.clean_context=true needs a teacher trained with clean leading "
                                 f"frames (stage.context_frames >= {cfg.context_frames}); {score_dir} has "
                                 f"{trained}: train one with `stage=teacher stage.context_frames=4` or "
                                 "drop stage.clean_context")
        self.generator = dit_from_export(ctx.init_from, frames_per_block=cfg.frames_per_block)
        # the ar model keeps its own block size: its teacher-forcing mask is what it learned
        self.real = dit_from_export(Path(score_dir)).requires_grad_(False).eval()
        self.critic = dit_from_export(Path(score_dir))
        self.guide = (dit_from_export(Path(cfg.ar)).requires_grad_(False).eval()
                      if cfg.real_score == "teacher_ar_guidance" else None)
        self.names = meta["action_names"]
        self.tokenizer = tokenizer_dir(cfg, ctx.init_from)
        self.step_list = diffusion.step_list(cfg.steps, cfg.shift)
        self.first_list = diffusion.first_frame_steps(cfg.shift)

    def networks(self) -> dict[str, nn.Module]:
        nets = {"generator": self.generator, "critic": self.critic, "real": self.real}
        return nets if self.guide is None else {**nets, "guide": self.guide}

    def optimizers(self) -> dict[str, OptimSpec]:
        c = self.cfg
        return {
            "generator": c.adamw("generator", c.lr_generator,
                                 ema=(EMASpec("generator", c.ema_decay, c.ema_start),)),
            "critic": c.adamw("critic", c.lr_critic),
        }

    def updates(self, step: int) -> list[str]:
        return ["generator", "critic"] if step % self.cfg.critic_ratio == 0 else ["critic"]

    def rollout(self, gen: nn.Module, batch: TensorDict, grad: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_hat (B, F, h, w, c), the mask (B, F) of generated frames, and the actions (B, F) the
        generator was given (frame 0's is null when the rollout starts from noise): the scores
        must judge the clip under the same actions the generator made it with."""
        x0, actions = batch["latents"].float(), batch["actions"].long()
        b, f = actions.shape
        k = len(self.step_list)
        # choices shared by every rank: each rank must make the same model calls (under FSDP
        # each call is a collective), see docs/design.md, "Several processes"
        exit_step = int(self.ctx.shared_randint(0, k))
        first_exit = int(self.ctx.shared_randint(0, len(self.first_list)))
        use_ctx = bool(self.ctx.shared_randint(0, 1000) < 1000 * self.cfg.context_prob)
        c = self.cfg.context_frames if use_ctx else 0
        if c == 0:
            actions = actions.clone()
            actions[:, 0] = -1  # a world started from noise has no action before its first frame
        x_hat = self_rollout(gen, actions, self.step_list.to(x0.device), self.first_list.to(x0.device),
                             exit_step, first_exit, context=x0[:, :c] if c else None, grad=grad)
        mask = torch.ones(b, f, dtype=torch.bool, device=x0.device)
        mask[:, :c] = False
        return x_hat, mask, actions

    def noise_level(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, F) sigma for the scores: one level per sample; 0 on the context frames (so they
        enter clean) with ``clean_context``."""
        sigma = dmd_noise_level(mask.shape[0], self.cfg.shift, mask.device).expand(mask.shape)
        return torch.where(mask, sigma, torch.zeros_like(sigma)) if self.cfg.clean_context else sigma

    def score(self, net: nn.Module, x_t: torch.Tensor, sigma: torch.Tensor, actions: torch.Tensor,
              x_hat: torch.Tensor) -> torch.Tensor:
        """Velocity of a score network at x_t; a causal score sees the rollout's clean frames."""
        return net(x_t, sigma, actions, clean=x_hat.detach() if self.causal_score else None)

    def loss(self, name: str, batch: TensorDict, step: int,
             nets: Mapping[str, nn.Module]) -> tuple[torch.Tensor, Logs]:
        if name == "generator":
            x_hat, mask, actions = self.rollout(nets["generator"], batch, grad=True)
            sigma = self.noise_level(mask)
            x_t = diffusion.add_noise(x_hat.detach(), torch.randn_like(x_hat), sigma)
            with torch.no_grad():
                null = torch.full_like(actions, -1)
                x0_c = diffusion.x0_from_velocity(x_t, self.score(self.real, x_t, sigma, actions, x_hat), sigma)
                if self.guide is None:
                    x0_u = diffusion.x0_from_velocity(x_t, self.score(self.real, x_t, sigma, null, x_hat), sigma)
                    x0_real = diffusion.cfg_x0_dmd(x0_c, x0_u, self.cfg.guidance)
                else:  # the teacher's x0, the ar model's guidance direction (frames see x_hat)
                    past = x_hat.detach()
                    g_c = diffusion.x0_from_velocity(x_t, self.guide(x_t, sigma, actions, clean=past), sigma)
                    g_u = diffusion.x0_from_velocity(x_t, self.guide(x_t, sigma, null, clean=past), sigma)
                    x0_real = x0_c + self.cfg.guidance * (g_c - g_u)
                x0_fake = diffusion.x0_from_velocity(x_t, self.score(nets["critic"], x_t, sigma, actions, x_hat),
                                                     sigma)
                grad = dmd_gradient(x_hat.detach(), x0_real, x0_fake, mask)
            loss = dmd_loss(x_hat, grad)
            return loss.float(), {"dmd_grad_rms": grad.pow(2).mean().sqrt()}
        with torch.no_grad():
            x_hat, mask, actions = self.rollout(nets["generator"], batch, grad=False)
        sigma = self.noise_level(mask)
        eps = torch.randn_like(x_hat)
        x_t = diffusion.add_noise(x_hat, eps, sigma)
        v = self.score(nets["critic"], x_t, sigma, actions, x_hat)
        return critic_flow_loss(v, eps, x_hat, mask), {}

    def export(self, out_dir: Path, weights: Mapping[str, dict[str, torch.Tensor]],
               batches: Iterator[TensorDict]) -> None:
        save_export(out_dir, self.generator, weights["generator"], self.names, "dmd", self.tokenizer,
                    batches, engine={"sampler": "few_step", "steps": self.cfg.steps,
                                     "first_frame_steps": 4, "shift": self.cfg.shift})
