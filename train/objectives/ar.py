"""Stage `ar`: the teacher-forcing autoregressive diffusion model (Causal Forcing's AR teacher), init
from the teacher.

Sequence [clean copy | noisy copy] under the block-causal teacher-forcing mask (a noisy block sees
itself and the clean copies of earlier blocks: worldmodel/attention.py), an independent noise
level per block (per frame when frame-wise), flow-matching loss on the noisy copy
(docs/design.md, "Flow-matching stages"). Frame-wise (``frames_per_block: 1``) or chunk-wise (k)
is a config value.
The clean stream is exactly what the KV cache holds at inference (tests/test_dit.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from train.objectives import register
from train.objectives._dit import flow_matching_loss
from train.objectives.teacher import DiTStage, DiTStageConfig
from worldmodel import diffusion


@dataclass
class ARConfig(DiTStageConfig):
    lr: float = 1e-4
    warmup_steps: int = 100
    frames_per_block: int = 1


@register("ar")
class ARObjective(DiTStage):
    Config = ARConfig
    stage_name = "ar"

    def dit_overrides(self) -> dict:
        return {"frames_per_block": self.cfg.frames_per_block}

    def noise_levels(self, b: int, t: int) -> torch.Tensor:
        return diffusion.sample_block_noise_level((b, t), self.cfg.shift, self.cfg.frames_per_block,
                                                  device=self.ctx.device)

    def flow_loss(self, dit, x0, actions, sigma):
        return flow_matching_loss(dit, x0, actions, sigma, self.cfg.loss_weighting, self.cfg.shift,
                                  clean=x0, motion=self.cfg.motion,
                                  motion_threshold=self.cfg.motion_threshold)
