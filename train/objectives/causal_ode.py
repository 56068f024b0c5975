"""Stage `causal_ode`: causal ODE distillation (Causal Forcing), the baseline of CD.

Trajectory generation: for real clips, the AR teacher integrates the guided PF-ODE with
N Euler steps from pure noise, every frame at the same noise level, with ground-truth clean
context (teacher forcing) — so frame i's trajectory is the ODE of p(x_i | real x_<i, actions).
The states at the 4-step list's times and the endpoint are stored. Regression: a stored
state k ~ U{0..3} at its time, GT context, x0 prediction regressed onto the ODE ENDPOINT.

How the stored data is made here: the first training calls generate trajectories for the clips
they receive (timed separately: ``ode_gen_s`` is this stage's data cost, reported with its
training time) until ``trajectories`` clips are stored (per process); every update trains on a
random batch from the store, so training sees only stored trajectories, as offline generation
would. The store is part of the objective's checkpoint state, so a resumed run does not
regenerate it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
from tensordict import TensorDict

from train.distill import ode_regression_loss
from train.objectives import AdamWConfig, Logs, TrainContext, register
from train.objectives._dit import StageError
from train.objectives.causal_cd import DistilledStudent
from worldmodel import diffusion, samplers


@dataclass
class CausalODEConfig(AdamWConfig):
    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.999)   # Causal Forcing's ODE-regression betas, unlike CD's
    grad_clip: float | None = 10.0
    grid_points: int = 32          # N Euler steps of the trajectory (must be a multiple of 4)
    guidance: float = 2.5          # same teacher CFG as causal CD, for a fair comparison
    trajectories: int = 1024       # clips whose trajectories are stored, per process
    shift: float = diffusion.DEFAULT_SHIFT
    frames_per_block: int = 0
    tokenizer: str | None = None


@register("causal_ode")
class CausalODEObjective(DistilledStudent):
    Config = CausalODEConfig
    stage_name = "causal_ode"

    def __init__(self, cfg: CausalODEConfig, ctx: TrainContext) -> None:
        super().__init__(cfg, ctx)
        if cfg.grid_points % 4:
            raise StageError(f"grid_points must be a multiple of 4 (the 4-step times are grid points), "
                             f"got {cfg.grid_points}")
        self.grid = diffusion.grid(cfg.grid_points, cfg.shift, include_terminal=True)
        self.keep = [i * cfg.grid_points // 4 for i in range(4)]  # grid indices of the 4-step list
        self.store: dict[str, torch.Tensor] = {}
        self.gen_s = 0.0

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student, "teacher": self.teacher}

    @property
    def stored(self) -> int:
        return len(self.store["gt"]) if self.store else 0

    @torch.no_grad()
    def generate(self, x0: torch.Tensor, actions: torch.Tensor) -> None:
        """Integrate the guided teacher ODE for a batch of real clips and store the states.

        In fp32 whatever the training precision (autocast off), and stored in fp32: the student
        regresses onto these endpoints, and a bf16 ODE of 32+ steps carries its rounding into
        every target."""
        t0 = time.perf_counter()
        with torch.autocast(x0.device.type, enabled=False):
            self._generate(x0.float(), actions)
        self.gen_s += time.perf_counter() - t0

    def _generate(self, x0: torch.Tensor, actions: torch.Tensor) -> None:
        v_c, v_u = self.teacher_v(x0, actions)

        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            v = v_c(x, sigma) if self.cfg.guidance == 1.0 else \
                diffusion.cfg_standard(v_c(x, sigma), v_u(x, sigma), self.cfg.guidance)
            return diffusion.x0_from_velocity(x, v, sigma)

        states: list[torch.Tensor] = []
        keep = set(self.keep)
        endpoint = samplers.euler(denoise, torch.randn_like(x0), self.grid,
                                  callback=lambda d: states.append(d["x"]) if d["i"] in keep else None)
        new = {"states": torch.stack(states, 1), "endpoint": endpoint, "gt": x0, "actions": actions}
        room = self.cfg.trajectories - self.stored
        for k, v in new.items():
            v = (v[:room].float() if v.is_floating_point() else v[:room]).cpu()
            if k in self.store:  # a store resumed from an older checkpoint may be fp16
                v = torch.cat([self.store[k].to(v.dtype), v])
            self.store[k] = v

    def loss(self, name: str, batch: TensorDict, step: int,
             nets: Mapping[str, nn.Module]) -> tuple[torch.Tensor, Logs]:
        x0, actions = batch["latents"].float(), batch["actions"].long()
        if self.stored < self.cfg.trajectories:
            self.generate(x0, actions)
        dev = x0.device
        idx = torch.randint(0, self.stored, (x0.shape[0],))
        k = torch.randint(0, 4, (x0.shape[0],))
        states = self.store["states"][idx, k].to(dev).float()   # (B, F, h, w, c)
        gt = self.store["gt"][idx].to(dev).float()
        acts = self.store["actions"][idx].to(dev)
        sigma = self.grid.to(dev)[torch.tensor(self.keep)[k]][:, None].expand(states.shape[:2])
        v = nets["student"](states, sigma, acts, clean=gt)
        x0_hat = diffusion.x0_from_velocity(states, v, sigma)
        loss = ode_regression_loss(x0_hat, self.store["endpoint"][idx].to(dev))
        return loss, {"ode_gen_s": self.gen_s, "stored": float(self.stored)}

    def state_dict(self) -> dict:
        return {"store": dict(self.store), "gen_s": self.gen_s}

    def load_state_dict(self, state: dict) -> None:
        self.store = dict(state.get("store", {}))
        self.gen_s = float(state.get("gen_s", 0.0))
