"""Inverse-dynamics probe: a small CNN that names the action from a (frame i-1, frame i) pair.

Trained on real frames of the training episodes only, so it measures whether a transition shows
its action at all; its accuracy on generated pairs, divided by its accuracy on the real pairs at
the same positions, says how much of the action's visible effect a world model reproduces
(1 = as readable as reality; chance-level = the model ignores actions). The input is both
frames plus their difference: the action lives in what changed, often a few pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ProbeConfig:
    num_actions: int
    resolution: int = 64
    width: int = 16
    steps: int = 1000          # training updates (cached afterwards, so paid once per dataset)
    batch_size: int = 64
    lr: float = 2e-3
    max_pairs: int = 20000     # training pairs kept in memory, spread evenly over episodes
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class InverseDynamics(nn.Module):
    """(prev, cur) uint8 (B, H, W, 3) each -> action logits (B, num_actions)."""

    def __init__(self, cfg: ProbeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Strided 3x3 convs from the first layer (each still sees every pixel, kernel > stride):
        # a full-resolution stem would cost 10x more for a probe that must train in minutes on a CPU.
        layers: list[nn.Module] = []
        c_in, c, side = 9, cfg.width, cfg.resolution
        # Down to 4x4, then a linear layer: where a sprite moved matters, so no global pooling.
        while side > 4:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(min(8, c // 4), c), nn.SiLU()]
            c_in, c, side = c, min(2 * c, 4 * cfg.width), (side + 1) // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in * side * side, cfg.num_actions)

    def forward(self, prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
        p = prev.permute(0, 3, 1, 2).float() / 127.5 - 1
        c = cur.permute(0, 3, 1, 2).float() / 127.5 - 1
        x = torch.cat([p, c, 4 * (c - p)], dim=1)  # the difference scaled up: it is usually tiny
        return self.head(self.features(x).flatten(1))


def train_probe(prev: np.ndarray, cur: np.ndarray, actions: np.ndarray, cfg: ProbeConfig,
                device: torch.device | str = "cpu") -> InverseDynamics:
    """Fit the probe on real pairs (N, H, W, 3) x 2 with their actions (N,) (all >= 0)."""
    g = torch.Generator().manual_seed(cfg.seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)  # initial weights: reproducible, without touching the caller's stream
    net = InverseDynamics(cfg).to(device)
    torch.random.set_rng_state(torch_state)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(cfg.steps, 1))
    P, C = torch.from_numpy(prev), torch.from_numpy(cur)
    A = torch.from_numpy(actions.astype(np.int64))
    net.train()
    for _ in range(cfg.steps):
        idx = torch.randint(0, len(A), (min(cfg.batch_size, len(A)),), generator=g)
        loss = F.cross_entropy(net(P[idx].to(device), C[idx].to(device)), A[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


@torch.no_grad()
def predict(net: InverseDynamics, prev: np.ndarray, cur: np.ndarray, batch: int = 512) -> np.ndarray:
    """Predicted action ids (N,) for pairs of uint8 frames (N, H, W, 3)."""
    dev = next(net.parameters()).device
    out = [net(torch.from_numpy(np.ascontiguousarray(prev[i:i + batch])).to(dev),
               torch.from_numpy(np.ascontiguousarray(cur[i:i + batch])).to(dev)).argmax(-1).cpu()
           for i in range(0, len(prev), batch)]
    return torch.cat(out).numpy() if out else np.zeros(0, np.int64)


def accuracy(net: InverseDynamics, prev: np.ndarray, cur: np.ndarray, actions: np.ndarray) -> float:
    """Fraction of pairs whose action the probe names; pairs with an unknown action (-1) skipped."""
    keep = actions >= 0
    if not keep.any():
        return float("nan")
    return float((predict(net, prev[keep], cur[keep]) == actions[keep]).mean())


def sequence_pairs(first: np.ndarray, frames: np.ndarray, actions: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Consecutive pairs of sequences (N, T, H, W, 3) that follow ``first`` (N, H, W, 3):
    (first, f0), (f0, f1), ... with actions (N, T) -> flattened (N*T, ...) prev, cur, actions."""
    prev = np.concatenate([first[:, None], frames[:, :-1]], axis=1)
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
    return flat(prev), flat(frames), actions.reshape(-1)
