"""Stage `causal_cd`: causal consistency distillation (Causal Forcing++; the step-by-step algorithm
is in docs/design.md, "Causal consistency distillation").

Student (trainable), EMA target and frozen AR teacher all start from the `ar` export. Per step:
a pair of adjacent times (t_n, t_{n+1}) on the N-point grid, ONE noise level for every frame of
a clip; the teacher takes one guided Euler step from t_n to t_{n+1} with ground-truth clean
context (teacher forcing); the student's x0 at t_n is pulled onto the EMA target's x0 at
t_{n+1}. No trajectories are stored. Frame-wise or chunk-wise follows the DiT's block size.

Choices the method leaves open, with reasons ("HY15" is the HunyuanVideo-1.5 port of Causal
Forcing++ in the minWM repository, "Wan21" its Wan2.1 one):
* The terminal pair (sigma_{N-1} -> 0) IS sampled (as HY15 does): its target is the
  teacher's own guided x0, which anchors the chain at the data end. Without it the smallest
  trained noise level is shift(1/N) (0.09 for N = 32, s = 3) and nothing ties the student's x0
  there to the teacher except self-consistency.
* n is drawn per clip, not once per batch as in the original (random.randrange): same
  expectation, lower variance.
* The EMA target follows the student once per optimizer step (the loop's `after_update` hook),
  not once per loss call: with gradient accumulation a per-call update would decay it mu^k per
  step, and a skipped step would still move it. It is a plain constant-decay average (no
  warm-up) and it is what the stage exports (the original saves only EMA weights after step 200).
* HY15 skips the optimizer step when the all-reduced grad norm is >= 10; here that is
  `skip_grad_norm` (off by default, as in the Wan21 recipe, which only clips).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor
from tensordict import TensorDict

from train.distill import consistency_loss, consistency_target, teacher_cfg_euler_step
from train.objectives import AdamWConfig, Logs, Objective, OptimSpec, TrainContext, register
from train.objectives._dit import (StageError, load_dit_weights, read_export, save_export,
                                   tokenizer_dir)
from worldmodel import diffusion
from worldmodel.dit import DiT, DiTConfig


@dataclass
class CausalCDConfig(AdamWConfig):
    lr: float = 5e-5
    grad_clip: float | None = 10.0
    ema_decay: float = 0.995       # target network mu (HY15 uses 0.999, the Wan21 configs 0.99)
    grid_points: int = 32          # N
    terminal_pair: bool = True
    guidance: float = 2.5          # teacher CFG, standard form (1 = off)
    shift: float = diffusion.DEFAULT_SHIFT
    frames_per_block: int = 0      # 0: the AR teacher's block size
    tokenizer: str | None = None


def dit_from_export(export_dir: Path, **overrides) -> DiT:
    meta = read_export(export_dir)
    dit = DiT(DiTConfig(**{**meta["config"], **overrides}))
    load_dit_weights(dit, export_dir)
    return dit


class DistilledStudent(Objective):
    """Shared by causal CD and causal ODE: a student (+ frozen AR teacher) from the `ar` export."""

    stage_name = "causal_cd"

    def __init__(self, cfg, ctx: TrainContext) -> None:
        super().__init__(cfg, ctx)
        if ctx.init_from is None:
            raise StageError(f"stage {self.stage_name} starts from the ar stage: set init_from=<ar export>")
        meta = read_export(ctx.init_from)
        if meta.get("stage") not in ("ar", "causal_cd", "causal_ode"):
            raise StageError(f"{ctx.init_from} is a {meta.get('stage')!r} export; {self.stage_name} "
                             "needs the teacher-forcing AR model (stage=ar)")
        over = {"frames_per_block": cfg.frames_per_block} if cfg.frames_per_block else {}
        self.student = dit_from_export(ctx.init_from, **over)
        self.teacher = dit_from_export(ctx.init_from, **over).requires_grad_(False).eval()
        self.names = meta["action_names"]
        self.tokenizer = tokenizer_dir(cfg, ctx.init_from)

    def teacher_v(self, clean: torch.Tensor, actions: torch.Tensor):
        null = torch.full_like(actions, -1)
        return (lambda x, s: self.teacher(x, s, actions, clean=clean),
                lambda x, s: self.teacher(x, s, null, clean=clean))

    def optimizers(self) -> dict[str, OptimSpec]:
        c = self.cfg
        return {"student": c.adamw("student", c.lr)}

    def export_weights(self, weights: Mapping[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return weights["student"]

    def export(self, out_dir: Path, weights: Mapping[str, dict[str, torch.Tensor]],
               batches: Iterator[TensorDict]) -> None:
        save_export(out_dir, self.student, self.export_weights(weights), self.names, self.stage_name,
                    self.tokenizer, batches, engine={"sampler": "few_step", "steps": 2,
                                                     "first_frame_steps": 4, "shift": self.cfg.shift})


@register("causal_cd")
class CausalCDObjective(DistilledStudent):
    Config = CausalCDConfig
    stage_name = "causal_cd"

    def __init__(self, cfg: CausalCDConfig, ctx: TrainContext) -> None:
        super().__init__(cfg, ctx)
        self.target = copy.deepcopy(self.student).requires_grad_(False).eval()
        self.grid = diffusion.grid(cfg.grid_points, cfg.shift, include_terminal=True)
        self.calls = 0

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student, "target": self.target, "teacher": self.teacher}

    @torch.no_grad()
    def after_update(self, name: str) -> None:
        """target <- mu * target + (1 - mu) * student, after each optimizer step of the student.
        Under FSDP the student's parameters are shards (DTensors) and the target a whole copy on
        every rank: each shard is gathered first (a collective, which every rank runs here)."""
        mu = self.cfg.ema_decay
        for t, s in zip(self.target.parameters(), self.student.parameters()):
            s = s.full_tensor() if isinstance(s, DTensor) else s
            t.lerp_(s.detach().to(t.dtype), 1.0 - mu)
        self.calls += 1

    def sample_pair(self, b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma_t, sigma_s) per clip: adjacent grid points, the terminal pair included if set."""
        pairs = self.cfg.grid_points if self.cfg.terminal_pair else self.cfg.grid_points - 1
        n = torch.randint(0, pairs, (b,), device=device)
        grid = self.grid.to(device)
        return grid[n][:, None], grid[n + 1][:, None]

    def loss(self, name: str, batch: TensorDict, step: int,
             nets: Mapping[str, nn.Module]) -> tuple[torch.Tensor, Logs]:
        x0 = batch["latents"].float()
        actions = batch["actions"].long()
        b, f = x0.shape[:2]
        sig_t, sig_s = self.sample_pair(b, x0.device)
        sig_t, sig_s = sig_t.expand(b, f), sig_s.expand(b, f)  # one sigma for every frame
        x_t = diffusion.add_noise(x0, torch.randn_like(x0), sig_t)
        with torch.no_grad():
            v_c, v_u = self.teacher_v(x0, actions)
            x_s = teacher_cfg_euler_step(v_c, v_u, x_t, sig_t, sig_s, self.cfg.guidance)
            target = consistency_target(lambda x, s: nets["target"](x, s, actions, clean=x0), x_s, sig_s)
        v = nets["student"](x_t, sig_t, actions, clean=x0)
        student_x0 = diffusion.x0_from_velocity(x_t, v, sig_t)
        loss = consistency_loss(student_x0, target)
        return loss, {"x0_err_vs_data": (student_x0.detach() - x0).pow(2).mean()}

    def export_weights(self, weights):
        return weights["target"]

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state.get("calls", 0))
