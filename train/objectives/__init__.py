"""The objective protocol: what one training stage tells the generic loop (`train/loop.py`).

A stage is one class, registered under its stage name, in `train/objectives/<name>.py`; the loop
is written once and knows nothing about any stage. The stage is chosen by config
(`python -m train stage=<name>`, i.e. `cfg.stage.name`), looked up in `REGISTRY`, never through
an if/elif ladder. Life of an objective, as the loop drives it:

    obj = Cls(cfg, ctx)            cfg: the stage's config dataclass `Cls.Config`, filled from
                                   `train/configs/stage/<name>.yaml` (+ overrides); ctx: TrainContext
    obj.networks()                 -> {name: nn.Module}: EVERY module to checkpoint, trainable and
                                   frozen; the loop moves them to ctx.device, wraps the trainable
                                   ones for DDP/FSDP, saves and restores all of them
    obj.optimizers()               -> {name: OptimSpec}: which networks each AdamW trains, its
                                   hyper-parameters, grad clip, and the EMAs it drives
    obj.updates(step)              -> [optimizer names], in order: the updates of this iteration
                                   (DMD: ["generator", "critic"] when step % 5 == 0 else ["critic"])
    obj.loss(name, batch, step, nets) -> (loss, logs)
                                   one scalar loss for optimizer `name` on a FRESH batch (each
                                   update and each accumulation micro-step gets its own); `nets`
                                   holds the modules to call: the same keys as `networks()`, the
                                   trainable ones wrapped (DDP/FSDP), so gradients are synchronised
                                   -- call `nets[...]`, not `self.<net>`, for anything that needs
                                   gradients. Runs under ctx's autocast. `logs`: {key: float or
                                   0-dim tensor}, averaged over micro-steps and ranks by the loop.
    obj.evaluate(step, nets, batches) -> {key: float} (optional; default {}); every `eval_every`
                                   steps, on every rank (so it may run collectives), under no_grad
                                   and autocast, with the live weights; `batches` is a fresh
                                   iterator that yields the same evaluation batches every time.
    obj.export(out_dir, weights, batches)
                                   rank 0 only, once training has finished: write what the next
                                   stage and the shipped world need (safetensors + JSON config)
                                   into out_dir (`<run_dir>/export`). `weights`: {network: full CPU
                                   fp32 state_dict}, EMA weights where the network has an EMA;
                                   `batches`: an iterator of fresh data batches on ctx.device
                                   (e.g. to fit the tokenizer's latent normalisation).
    obj.state_dict() / obj.load_state_dict(d)
                                   optional extra state (counters, buffers that are not in any
                                   network) saved in the checkpoint; default: nothing.

Randomness under DDP: every rank has its own torch stream (seeded `seed + rank`), so per-sample
noise differs between ranks as it should. A choice that must be the SAME on every rank (DMD's exit
step, a shared noise level) comes from `ctx.shared_randint`, which every rank calls, in the same
order, drawing from its own stream and then taking rank 0's value (so the streams stay aligned).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn as nn
from tensordict import TensorDict

Logs = dict[str, "float | torch.Tensor"]


@dataclass
class EMASpec:
    """An exponential moving average of one network, driven by one optimizer.

    ema <- decay * ema + (1 - decay) * live, after each step of the owning optimizer from
    `start_step` on; at `start_step` the EMA is (re)set to the live weights, as Causal Forcing's DMD
    creates its EMA at step 200 from the current generator. Exports use the EMA weights.
    """

    network: str
    decay: float = 0.999
    start_step: int = 0


@dataclass
class OptimSpec:
    """One AdamW optimizer. It trains every parameter with `requires_grad` of `networks` (or
    exactly `params`, if given). Weight decay goes to matrices/kernels only (dim >= 2), not to
    biases, norms and embeddings' gains, as in nanoGPT. `lr` ramps linearly over `warmup_steps`
    updates of this optimizer, then stays constant."""

    networks: tuple[str, ...]
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0   # max global grad norm; None = no clipping
    # Skip the whole update (optimizer step, update count, EMA) when the global grad norm, measured
    # before clipping, is >= this or not finite (the guard against spikes of the HunyuanVideo-1.5
    # port of Causal Forcing++, which skips at 10); None = never.
    skip_grad_norm: float | None = None
    warmup_steps: int = 0
    ema: tuple[EMASpec, ...] = ()
    params: list[nn.Parameter] | None = None


@dataclass
class AdamWConfig:
    """The optimizer knobs every stage has (``stage.betas=[0.9,0.99] stage.grad_clip=1.0`` ...),
    declared once. Each stage's config dataclass inherits them and redeclares a default only where
    its recipe differs; it adds its own learning rate(s) (``lr``; DMD: ``lr_generator`` and
    ``lr_critic``), since no two stages share one."""

    betas: tuple[float, float] = (0.9, 0.99)  # AdamW's
    weight_decay: float = 0.01      # AdamW's, on matrices and kernels only
    grad_clip: float | None = 1.0   # max global grad norm (null: no clipping)
    warmup_steps: int = 0           # updates over which the learning rate ramps up linearly
    skip_grad_norm: float | None = None  # skip updates whose grad norm is >= this (null: never; 10 guards spikes)

    def adamw(self, network: str, lr: float, ema: tuple[EMASpec, ...] = (),
              warmup: bool = True) -> OptimSpec:
        """The OptimSpec of one network trained with these knobs at ``lr``."""
        return OptimSpec(networks=(network,), lr=lr, betas=tuple(self.betas),
                         weight_decay=self.weight_decay, grad_clip=self.grad_clip,
                         skip_grad_norm=self.skip_grad_norm,
                         warmup_steps=self.warmup_steps if warmup else 0, ema=ema)


@dataclass
class TrainContext:
    """What an objective may know about where it runs. Built once by the loop."""

    device: torch.device
    dtype: torch.dtype            # autocast dtype; torch.float32 means no autocast
    rank: int
    world_size: int
    run_dir: Path
    init_from: Path | None        # the previous stage's export dir, or None (from scratch)
    model: Mapping[str, Any]      # the `model` config group (sizes of every network)
    seed: int
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, for tests and tools

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> AbstractContextManager:
        """bf16/fp16 autocast on this device, or nothing for fp32. Weights stay fp32."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def shared_randint(self, low: int, high: int, size: tuple[int, ...] = (),
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """A random int64 tensor in [low, high) that is identical on every rank.

        Every rank draws (so its RNG stream advances exactly as rank 0's does) and then takes rank
        0's value: drawing only on rank 0 would put its stream ahead of the others' for every later
        draw (docs/design.md, "Several processes"). Collective: call it on every rank, in the same
        order.
        """
        x = torch.randint(low, high, size, generator=generator, device=self.device if generator is None
                          else generator.device)
        if self.world_size > 1:
            x = x.to(self.device)
            dist.broadcast(x, src=0)
        return x


class Objective:
    """Base class for a stage objective; see the module docstring for the protocol.

    Subclasses set `Config` (their stage config dataclass) and implement `networks`, `optimizers`,
    `loss` and `export`. `updates` defaults to stepping every optimizer once, in declaration order.
    """

    Config: ClassVar[type] = object

    def __init__(self, cfg: Any, ctx: TrainContext) -> None:
        self.cfg = cfg
        self.ctx = ctx

    def networks(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def optimizers(self) -> dict[str, OptimSpec]:
        raise NotImplementedError

    def updates(self, step: int) -> list[str]:
        return list(self.optimizers())

    def loss(self, name: str, batch: TensorDict, step: int,
             nets: Mapping[str, nn.Module]) -> tuple[torch.Tensor, Logs]:
        raise NotImplementedError

    def after_update(self, name: str) -> None:
        """Called once after each optimizer step of ``name`` (not per accumulation micro-step,
        not for a skipped step): for state that must follow the weights, like a target network."""

    def evaluate(self, step: int, nets: Mapping[str, nn.Module],
                 batches: Iterator[TensorDict]) -> dict[str, float]:
        return {}

    def export(self, out_dir: Path, weights: Mapping[str, dict[str, torch.Tensor]],
               batches: Iterator[TensorDict]) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# ----- registry: stage name -> objective class ----------------------------------------------

REGISTRY: dict[str, type[Objective]] = {}


def register(name: str) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator: `@register("tokenizer") class TokenizerObjective(Objective): ...`."""

    def deco(cls: type[Objective]) -> type[Objective]:
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise ValueError(f"stage {name!r} is registered twice: {REGISTRY[name]} and {cls}")
        REGISTRY[name] = cls
        return cls

    return deco


def available_stages() -> list[str]:
    """Stage names that have an objective module here (`train/objectives/<name>.py`)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get_objective(name: str) -> type[Objective]:
    """The objective class registered for stage `name`.

    By convention stage `name` lives in the module `train.objectives.<name>`, imported here on
    first use: importing every stage up front would make each stage pay for (and break on) the
    imports of all the others.
    """
    if name not in REGISTRY:
        if name not in available_stages():
            raise KeyError(f"unknown stage {name!r}; stages with an objective: {available_stages()}")
        importlib.import_module(f"{__name__}.{name}")
    if name not in REGISTRY:
        raise KeyError(f"train/objectives/{name}.py does not register a stage {name!r} "
                       f"(decorate its class with @register({name!r}))")
    return REGISTRY[name]
