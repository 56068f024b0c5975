"""Stand-in networks and tiny exports for the distillation objectives' hand-computed loss tests
(tests/test_method_losses.py, tests/test_ode_losses.py): see the first file's docstring."""

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file
from tensordict import TensorDict

from train.objectives import TrainContext
from worldmodel.dit import DiT, DiTConfig


def write_export(path: Path, stage: str) -> Path:
    """A minimal transformer-stage export (dit.json + dit.safetensors) for the objectives' __init__."""
    cfg = DiTConfig(width=32, depth=1, heads=2, latent_size=2, latent_channels=3, num_actions=3,
                    max_frames=8, train_frames=4)
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in DiT(cfg).state_dict().items()}, str(path / "dit.safetensors"))
    (path / "dit.json").write_text(json.dumps({"config": asdict(cfg), "action_names": ["a", "b", "c"],
                                               "stage": stage, "tokenizer": str(path)}))
    return path


def context(tmp_path: Path, init_from: Path) -> TrainContext:
    return TrainContext(device=torch.device("cpu"), dtype=torch.float32, rank=0, world_size=1,
                        run_dir=tmp_path / "run", init_from=init_from, model={}, seed=0)


class StandIn(nn.Module):
    """A "network" whose velocity is ``fn(theta, x, sigma, given, clean)``, with sigma and given
    (1 where the action is real, 0 for the null action -1) broadcast per frame. ``theta`` is its
    one parameter (so EMA updates and gradients can be checked); every call is recorded."""

    def __init__(self, theta: float, fn, trainable: bool = True):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(float(theta)), requires_grad=trainable)
        self.fn = fn
        self.calls: list[dict] = []

    def forward(self, x, sigma, actions, clean=None, cache=None):
        per = lambda t: t.float()[:, :, None, None, None]  # noqa: E731
        self.calls.append({"x": x.detach().clone(), "sigma": sigma.detach().clone(),
                           "actions": actions.clone(), "grad": torch.is_grad_enabled(),
                           "clean": None if clean is None else clean.detach().clone()})
        return self.fn(self.theta, x, per(sigma), per(actions >= 0), clean)


def pin_noise(monkeypatch, value: float) -> None:
    """Every randn_like inside the loss returns ``value``: the "noise" becomes a known constant."""
    monkeypatch.setattr(torch, "randn_like", lambda x, **kw: torch.full_like(x, value))


def batch_of(latents: torch.Tensor, actions: torch.Tensor) -> TensorDict:
    return TensorDict({"latents": latents, "actions": actions}, batch_size=[latents.shape[0]])
