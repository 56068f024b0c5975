"""The training loop's own knobs (top-level config keys), checked before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, fields

from omegaconf import DictConfig

from train import UsageError
from train.distributed import check_device


@dataclass
class LoopConfig:
    """The loop's knobs: top-level keys of the config (`python -m train max_steps=100 ...`)."""

    max_steps: int = 1000         # training iterations (updates); one iteration = the objective's `updates(step)`
    seed: int = 0
    device: str = "auto"          # auto | cpu | cuda | cuda:<i>
    dtype: str = "auto"           # auto (bf16 where supported, else fp32) | bf16 | fp16 | fp32
    parallel: str = "ddp"         # ddp | fsdp, used when launched by torchrun with several processes
    find_unused_parameters: bool = False  # DDP: for networks that leave some parameters unused
    grad_accum: int = 1           # micro-batches per update
    ckpt_every: int = 500
    ckpt_minutes: float = 5.0     # also checkpoint when this long has passed since the last one
    #                               (0 = by steps only): a killed run loses at most this much work
    keep_ckpts: int = 3
    log_every: int = 10
    eval_every: int = 0           # 0 = no periodic evaluation
    progress: bool = True         # progress bar on rank 0
    max_minutes: float = 0.0      # > 0: stop (checkpoint + export) after this long in this call;
    #                               rerunning the same command resumes towards `max_steps`


# The smallest value each numeric knob may take (what the loop needs to make sense of it).
_MINIMUM = {"max_steps": 1, "grad_accum": 1, "ckpt_every": 1, "log_every": 1, "keep_ckpts": 0,
            "eval_every": 0, "max_minutes": 0, "ckpt_minutes": 0}
_CHOICES = {"dtype": ("auto", "bf16", "fp16", "fp32"), "parallel": ("ddp", "fsdp")}


def loop_config(cfg: DictConfig) -> LoopConfig:
    """The loop's knobs from the config, checked: hydra passes `max_steps=abc` through as a string
    and `max_steps=0` as a number, and either would otherwise fail deep inside the loop (or export an
    untrained model). Raises UsageError naming the key and a valid value."""
    values = {}
    for f in fields(LoopConfig):
        if f.name not in cfg:
            continue
        v, kind = cfg[f.name], f.type
        example = f"{f.name}={f.default}"
        if kind == "int":
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if isinstance(v, bool) or not isinstance(v, int):
                raise UsageError(f"{f.name}={v} is not a whole number: pass e.g. {example}")
        elif kind == "float":
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise UsageError(f"{f.name}={v} is not a number: pass e.g. {example}")
            v = float(v)
        elif kind == "bool" and not isinstance(v, bool):
            raise UsageError(f"{f.name}={v} is not true or false: pass {f.name}=true or {f.name}=false")
        elif kind == "str":
            v = str(v)
            if f.name in _CHOICES and v not in _CHOICES[f.name]:
                raise UsageError(f"{f.name}={v} is not one of {'|'.join(_CHOICES[f.name])}: pass e.g. {example}")
        low = _MINIMUM.get(f.name)
        if low is not None and v < low:
            what = "at least 1" if low == 1 else "0 or more"
            raise UsageError(f"{f.name}={v} must be {what}: pass e.g. {example}")
        values[f.name] = v
    lc = LoopConfig(**values)
    check_device(lc.device)
    return lc
