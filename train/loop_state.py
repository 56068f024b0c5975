"""What the training loop builds and saves, written once: the objective from its config, AdamW,
optimizer and network state (plain or FSDP-sharded), seeding, and the atomic export."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm

from train import UsageError
from train.distributed import load_like
from train.objectives import Objective, OptimSpec, TrainContext, get_objective

WALLCLOCK = "wallclock.json"  # in each export: {"steps": N, "of": target steps, "seconds": S}


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def build_objective(stage: DictConfig, ctx: TrainContext) -> Objective:
    """The registered objective for `stage.name`, built from its config dataclass."""
    cls = get_objective(stage.name)
    fields_cfg = {k: v for k, v in OmegaConf.to_container(stage, resolve=True).items() if k != "name"}
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls.Config), fields_cfg))
    return cls(cfg, ctx)


def make_optimizer(spec: OptimSpec, nets: dict[str, nn.Module]) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and kernels only (dim >= 2), as nanoGPT does."""
    params = spec.params if spec.params is not None else [
        p for n in spec.networks for p in nets[n].parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": spec.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=spec.lr, betas=tuple(spec.betas))


def opt_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def _fsdp_nets(spec: OptimSpec, nets: dict[str, nn.Module]) -> list[nn.Module]:
    return [nets[n] for n in spec.networks if isinstance(nets[n], FSDPModule)]


def optimizer_state(opt: torch.optim.Optimizer, nets: dict[str, nn.Module], spec: OptimSpec) -> dict[str, Any]:
    """Plain state_dict, or under FSDP the full (gathered) one keyed by parameter name."""
    fsdp = _fsdp_nets(spec, nets)
    if fsdp:
        return get_optimizer_state_dict(fsdp[0] if len(fsdp) == 1 else nn.ModuleList(fsdp), opt,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return opt.state_dict()


def load_optimizer(opt: torch.optim.Optimizer, nets: dict[str, nn.Module], spec: OptimSpec,
                   state: dict[str, Any]) -> None:
    fsdp = _fsdp_nets(spec, nets)
    if fsdp:
        set_optimizer_state_dict(fsdp[0] if len(fsdp) == 1 else nn.ModuleList(fsdp), opt, state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state)


def load_network(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict into a plain or FSDP-sharded network."""
    own = net.state_dict()
    missing = set(own) ^ set(state)
    # DTensor shards report the global shape, so this compares whole tensors under FSDP too
    reshaped = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or reshaped:
        raise UsageError(f"the checkpoint does not match the network ({sorted(missing)[:5]} "
                         f"{reshaped[:3]} ...): the model config changed since it was written; use a new "
                         f"run_dir or the old model=...")
    with torch.no_grad():
        for k, v in own.items():
            load_like(v, state[k])


def export(objective: Objective, weights: dict[str, dict[str, torch.Tensor]], batches: Any,
           run_dir: Path, cfg: DictConfig, wallclock: dict) -> None:
    """Let the objective write `<run_dir>/export`, atomically: into a temporary dir, then renamed.

    ``wallclock.json`` beside the weights says how far (steps of ``of``) and how long the stage trained (seconds of its loop
    summed over resumes, the objective's own data generation included, set-up excluded): the
    evaluation table's training-cost column."""
    out, tmp = run_dir / "export", run_dir / ".export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {k: {n: t.float() if t.is_floating_point() else t for n, t in w.items()}
               for k, w in weights.items()}
    with torch.no_grad():
        objective.export(tmp, weights, batches)
    OmegaConf.save(cfg, tmp / "train_config.yaml", resolve=True)
    (tmp / WALLCLOCK).write_text(json.dumps(wallclock))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    tqdm.write(f"exported {out}")

