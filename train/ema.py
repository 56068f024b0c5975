"""Exponential moving average of a network's weights (DiT's `update_ema`, as a small class).

The shadow weights are a dict keyed like `net.state_dict()`, not a deep copy of the module, so the
same code serves plain, DDP and FSDP networks (under FSDP the entries are the local shards).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor


WARMED_UP = 10**9  # update count given to EMA states saved before the warm-up existed


class EMA:
    """ema <- d * ema + (1 - d) * live for floating tensors; other buffers are copied.

    Parameters and floating buffers (e.g. a tokenizer's latent statistics) are averaged the same
    way; integer buffers (counters) just follow the live network.

    Warm-up: d = min(decay, (1 + n) / (10 + n)) after n updates since the last reset. Without it a
    0.999 average of a run a few hundred steps long is mostly its initial weights (a zero-init
    head exports as nearly zero); with it short runs export what they learned and long runs get
    the full decay after ~10k updates. ``warmup=False`` gives the plain constant decay.
    """

    def __init__(self, net: nn.Module, decay: float, warmup: bool = True) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.shadow: dict[str, torch.Tensor] = {}
        self.reset(net)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def reset(self, net: nn.Module) -> None:
        """Start over from the live weights (fp32 copies, whatever the live dtype)."""
        self.shadow = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                       for k, v in net.state_dict().items()}
        self.updates = 0

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        live = net.state_dict()
        decay = self.current_decay()
        floats = [k for k, v in self.shadow.items() if v.is_floating_point()]
        # One fused lerp per kind of tensor: ema + (1 - decay) * (live - ema). Under FSDP the
        # parameters are sharded DTensors and the buffers plain tensors, which one foreach call
        # cannot mix.
        sharded = [k for k in floats if isinstance(self.shadow[k], DTensor)]
        for group in (sharded, [k for k in floats if k not in set(sharded)]):
            if group:
                torch._foreach_lerp_([self.shadow[k] for k in group],
                                     [live[k].detach().float() for k in group], 1.0 - decay)
        for k, v in self.shadow.items():
            if not v.is_floating_point():
                v.copy_(live[k])
        self.updates += 1

    @contextmanager
    def swapped_in(self, net: nn.Module) -> Iterator[nn.Module]:
        """`net` holds the shadow weights inside the block and its live weights again after it
        (evaluation then scores what the export will carry, not the live weights)."""
        state = net.state_dict()  # tensors that share storage with the parameters and buffers
        live = {k: v.detach().clone() for k, v in state.items()}
        with torch.no_grad():
            for k, v in state.items():
                v.copy_(self.shadow[k])
        try:
            yield net
        finally:
            with torch.no_grad():
                for k, v in state.items():
                    v.copy_(live[k])

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        # Checkpoints from before the warm-up existed resume as fully warmed up.
        self.updates = int(state.get("updates", WARMED_UP))
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
