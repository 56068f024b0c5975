"""Reward and termination heads on latents, so the world-model env can score imagined frames.

Rewards are predicted as sign classes {-1, 0, +1} (Atari-style clipped rewards; DIAMOND and
Dreamer do the same), termination as a binary logit. The input is the latent of the frame just
reached, the previous frame's latent and the action that led to it, because a reward is caused
by a transition, not by a single frame.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

REWARD_VALUES = (-1.0, 0.0, 1.0)  # class index -> reward sign


@dataclass
class RewardConfig:
    latent_size: int = 8
    latent_channels: int = 8
    num_actions: int = 18
    hidden: int = 128

    def to_dict(self) -> dict:
        return asdict(self)


class RewardHeads(nn.Module):
    """(prev latents, latents, action) -> reward-class logits (3) and a termination logit."""

    def __init__(self, cfg: RewardConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = 2 * cfg.latent_channels
        self.conv = nn.Sequential(
            nn.Conv2d(c, cfg.hidden, 3, padding=1), nn.SiLU(),
            nn.Conv2d(cfg.hidden, cfg.hidden, 3, stride=2, padding=1), nn.SiLU(),
        )
        self.action = nn.Embedding(cfg.num_actions + 1, cfg.hidden)  # + null id
        self.out = nn.Sequential(nn.Linear(cfg.hidden, cfg.hidden), nn.SiLU(), nn.Linear(cfg.hidden, 4))

    def forward(self, prev: torch.Tensor, cur: torch.Tensor, actions: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """prev/cur latents (B, h, w, c), actions (B,) -> reward logits (B, 3), end logits (B,)."""
        dtype = self.out[0].weight.dtype
        x = torch.cat([prev, cur], dim=-1).to(dtype).permute(0, 3, 1, 2)
        h = self.conv(x).mean(dim=(2, 3))
        a = torch.where(actions < 0, torch.full_like(actions, self.cfg.num_actions), actions)
        out = self.out(h + self.action(a)).float()
        return out[:, :3], out[:, 3]

    @torch.no_grad()
    def predict(self, prev: torch.Tensor, cur: torch.Tensor, actions: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Most likely reward value (B,) float and terminated flag (B,) bool."""
        logits, end = self(prev, cur, actions)
        values = torch.tensor(REWARD_VALUES, device=logits.device)
        return values[logits.argmax(-1)], end > 0
