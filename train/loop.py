"""The one training loop. Every stage runs through `train(cfg)`; what differs between stages is
the objective (`train/objectives/<stage>.py`), chosen by `cfg.stage.name`.

Read top to bottom: setup (device, dtype, process group, seeds) -> objective, networks,
optimizers, EMAs -> data -> resume -> the loop (updates as the objective orders them, gradient
accumulation, clipping, EMA) -> logs, evaluation, checkpoints -> export. Rerunning the same
command continues from the newest checkpoint and ends with the same weights as a run that was
never interrupted (bit-exact on CPU).
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import time
from collections import defaultdict
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, fields
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
from train.checkpoint import load_newest_readable, rng_state, save_checkpoint, set_aside, set_rng_state
from train.data import build_data, clip_batches
from train.distributed import (all_gather_object, barrier, check_device, full_state_dict, gather_full,
                               init_distributed, load_like, mean_over_ranks, no_sync, pick_dtype, wrap)
from train.ema import EMA, WARMED_UP
from train.interrupt import Stopped, StopRequest
from train.metrics_log import MetricsLog, plot_metrics
from train.objectives import EMASpec, Objective, OptimSpec, TrainContext, get_objective

WALLCLOCK = "wallclock.json"  # in each export: {"steps": N, "of": target steps, "seconds": S}

EVAL_SEED_OFFSET = 7919  # evaluation/export batches come from their own stream, never the training one


@dataclass
class LoopConfig:
    """The loop's knobs: top-level keys of the config (`python -m train steps=100 ...`)."""

    steps: int = 1000             # iterations; one iteration = the objective's `updates(step)`
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
    #                               rerunning the same command resumes towards `steps`


# The smallest value each numeric knob may take (what the loop needs to make sense of it).
_MINIMUM = {"steps": 1, "grad_accum": 1, "ckpt_every": 1, "log_every": 1, "keep_ckpts": 0,
            "eval_every": 0, "max_minutes": 0, "ckpt_minutes": 0}
_CHOICES = {"dtype": ("auto", "bf16", "fp16", "fp32"), "parallel": ("ddp", "fsdp")}


def loop_config(cfg: DictConfig) -> LoopConfig:
    """The loop's knobs from the config, checked: hydra passes `steps=abc` through as a string
    and `steps=0` as a number, and either would otherwise fail deep inside the loop (or export an
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


def train(cfg: DictConfig) -> Path:
    """Run (or resume) the stage described by `cfg` to `cfg.steps`; returns the run directory.
    SIGTERM or Ctrl-C stop it at the end of a step with a checkpoint and the export, then raise
    `Stopped` (train/interrupt.py)."""
    with StopRequest() as stop:
        return _train(cfg, stop)


def _train(cfg: DictConfig, stop: StopRequest) -> Path:
    lc = loop_config(cfg)
    d, device = init_distributed(lc.device)
    dtype = pick_dtype(lc.dtype, device)
    run_dir = Path(cfg.run_dir)
    init_from = Path(cfg.init_from) if cfg.get("init_from") else None
    if init_from is not None and not init_from.exists():
        prev = init_from.parent.name if init_from.name == "export" else "<previous stage>"
        raise UsageError(
            f"stage {cfg.stage.name!r} starts from a previous stage's export, {init_from}, which does "
            f"not exist. Train that stage first (python -m train stage={prev} data=... "
            f"runs_root={cfg.runs_root}), or point init_from=<export dir> at one.")
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = TrainContext(device=device, dtype=dtype, rank=d.rank, world_size=d.world_size, run_dir=run_dir,
                       init_from=init_from, model=OmegaConf.to_container(cfg.model, resolve=True),
                       seed=lc.seed)

    # ----- data (first: the objective sizes its action embedding from the dataset's actions) -----
    source = build_data(cfg.data, rank=d.rank, world_size=d.world_size, device=device, run_dir=run_dir)
    ctx.extra["action_names"] = list(source.action_names)
    ctx.extra["clip_len"] = int(cfg.data.clip_len)
    batches = clip_batches(source, cfg.data, seed=lc.seed, rank=d.rank, world_size=d.world_size, device=device)
    eval_batches = lambda: clip_batches(source, cfg.data, seed=lc.seed + EVAL_SEED_OFFSET,  # noqa: E731
                                        rank=d.rank, world_size=d.world_size, device=device)

    # ----- objective, networks, optimizers, EMAs -----
    # Same seed on every rank while building: identical initial weights (FSDP does not broadcast).
    seed_everything(lc.seed)
    objective = build_objective(cfg.stage, ctx)
    nets = {k: v.to(device) for k, v in objective.networks().items()}
    specs = objective.optimizers()
    trainable = sorted({n for s in specs.values() for n in s.networks})
    for name, net in nets.items():
        if name not in trainable:
            net.requires_grad_(False).eval()  # frozen: no grads, no dropout
    wrapped = {k: wrap(v, lc.parallel, device, lc.find_unused_parameters) if k in trainable else v
               for k, v in nets.items()}
    optims = {k: make_optimizer(s, nets) for k, s in specs.items()}
    scalers = {k: torch.amp.GradScaler(device.type, enabled=dtype == torch.float16) for k in specs}
    emas: dict[str, tuple[str, EMASpec, EMA]] = {
        e.network: (k, e, EMA(nets[e.network], e.decay)) for k, s in specs.items() for e in s.ema}
    counts: dict[str, int] = {k: 0 for k in specs}  # updates done per optimizer (warm-up, EMA start)

    # ----- resume -----
    start, wall_before = 0, 0.0
    ckpt_path, ck, unreadable = load_newest_readable(run_dir)
    if ckpt_path is not None:
        start = ck["step"]
        wall_before = float(ck.get("wall_seconds", 0.0))
        for name, net in nets.items():
            load_network(net, ck["networks"][name])
        for name, opt in optims.items():
            load_optimizer(opt, nets, specs[name], ck["optimizers"][name])
            scalers[name].load_state_dict(ck["scalers"][name])
        for name, (_, _, ema) in emas.items():
            for k, v in ck["ema"][name]["shadow"].items():
                load_like(ema.shadow[k], v)
            ema.updates = int(ck["ema"][name].get("updates", WARMED_UP))
        counts.update(ck["counts"])
        objective.load_state_dict(ck["objective"])
        if len(ck["rng"]) == d.world_size:
            batches.load_state_dict(ck["data"][d.rank])
            set_rng_state(ck["rng"][d.rank])
        else:  # another process count: shards differ anyway; keep the epoch, start fresh streams
            batches.load_state_dict(ck["data"][0])
            seed_everything(lc.seed + d.rank + 1_000 * start)
            if d.rank == 0:
                tqdm.write(f"warning: checkpoint written by {len(ck['rng'])} processes, resuming on "
                           f"{d.world_size}: weights continue exactly, data order and noise do not")
        barrier(d)  # every rank has read its checkpoint before rank 0 renames damaged ones
        if d.rank == 0:
            for path, why in unreadable:
                tqdm.write(f"warning: checkpoint {path} is unreadable ({why}); kept as "
                           f"{set_aside(path).name}")
            older = "the newest readable checkpoint, " if unreadable else ""
            tqdm.write(f"resuming {run_dir} from {older}{ckpt_path.name} (step {start})")
    else:
        seed_everything(lc.seed + d.rank)  # ranks draw different noise from here on
    if d.rank == 0:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    log = MetricsLog(run_dir / "metrics.jsonl", resume_step=start if ckpt_path else None) if d.rank == 0 else None

    trained = {"seconds": wall_before}  # loop time up to the newest checkpoint, summed over calls

    def checkpoint(step: int) -> None:
        trained["seconds"] = wall_before + time.perf_counter() - t_start
        state = {
            "step": step,
            "wall_seconds": trained["seconds"],
            "networks": {k: full_state_dict(v) for k, v in nets.items()},
            "optimizers": {k: optimizer_state(o, nets, specs[k]) for k, o in optims.items()},
            "scalers": {k: s.state_dict() for k, s in scalers.items()},
            "ema": {k: {"decay": e.decay, "updates": e.updates, "shadow": gather_full(e.shadow)}
                    for k, (_, _, e) in emas.items()},
            "counts": dict(counts),
            "objective": objective.state_dict(),
            "rng": all_gather_object(rng_state(), d),
            "data": all_gather_object(batches.state_dict(), d),
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        if d.rank == 0:
            save_checkpoint(state, run_dir, lc.keep_ckpts)
            plot_metrics(log.read(), run_dir / "metrics.png")
        barrier(d)

    # ----- the loop -----
    bar = tqdm(total=lc.steps, initial=start, disable=d.rank != 0 or not lc.progress, dynamic_ncols=True)
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
    n_logs: dict[str, int] = defaultdict(int)
    samples, busy = 0, 0.0  # since the last log line; busy excludes evaluation and checkpoints
    t_start = time.perf_counter()
    last_ckpt = t_start  # when the newest checkpoint was written (resume: as good as now)
    done, signalled = start, False
    for step in range(start, lc.steps):
        t_step = time.perf_counter()
        for name in objective.updates(step):
            spec, opt, scaler = specs[name], optims[name], scalers[name]
            for o in optims.values():  # grads left by another network's update must not leak in
                o.zero_grad(set_to_none=True)
            for micro in range(lc.grad_accum):
                batch = next(batches)
                last = micro == lc.grad_accum - 1
                sync = nullcontext() if last else no_sync([wrapped[n] for n in trainable])
                with sync:
                    with ctx.autocast():
                        loss, logs = objective.loss(name, batch, step, wrapped)
                    scaler.scale(loss / lc.grad_accum).backward()
                samples += batch.batch_size[0]
                for k, v in {"loss": loss, **logs}.items():
                    sums[f"{name}/{k}"] += torch.as_tensor(v, device=device).detach().float()
                    n_logs[f"{name}/{k}"] += 1
            for g in opt.param_groups:  # linear warm-up, counted in this optimizer's own updates
                g["lr"] = spec.lr * min(1.0, (counts[name] + 1) / max(1, spec.warmup_steps))
            scaler.unscale_(opt)
            skip = False
            if spec.grad_clip is not None or spec.skip_grad_norm is not None:
                # clip_grad_norm_ returns the norm before clipping; inf max_norm measures only.
                clip = spec.grad_clip if spec.grad_clip is not None else float("inf")
                norm = torch.nn.utils.clip_grad_norm_(opt_params(opt), clip)
                norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
                sums[f"{name}/grad_norm"] += norm.detach().float()
                n_logs[f"{name}/grad_norm"] += 1
                if spec.skip_grad_norm is not None:
                    # grads are already all-reduced, so every rank reads the same norm and agrees
                    skip = not bool(torch.isfinite(norm)) or float(norm) >= spec.skip_grad_norm
                    sums[f"{name}/skipped"] += float(skip)
                    n_logs[f"{name}/skipped"] += 1
            if skip:
                opt.zero_grad(set_to_none=True)
                scaler.update()
                continue
            scaler.step(opt)
            scaler.update()
            counts[name] += 1
            for net_name, (owner, e, ema) in emas.items():
                # After `start_step` updates the EMA restarts from the live weights, then averages.
                if owner == name and counts[name] == e.start_step:
                    ema.reset(nets[net_name])
                elif owner == name and counts[name] > e.start_step:
                    ema.update(nets[net_name])
        done = step + 1
        busy += time.perf_counter() - t_step
        bar.update(1)
        # Every rank must agree to stop: the run stops when any rank's clock is past the deadline
        # or any rank was sent a signal (torchrun forwards SIGTERM to every worker). The all-reduce
        # waits for the device, so without a deadline ranks compare notes only at log steps (which
        # sync anyway): a signal is then honoured within log_every steps.
        # The checkpoint clock is agreed on the same way (a checkpoint is collective): under
        # several processes a time checkpoint comes within log_every steps of being due.
        now = time.perf_counter()
        flags = [float(lc.max_minutes > 0 and now - t_start > 60 * lc.max_minutes),
                 float(stop.signum is not None),
                 float(lc.ckpt_minutes > 0 and now - last_ckpt >= 60 * lc.ckpt_minutes)]
        if d.enabled and (lc.max_minutes > 0 or done % lc.log_every == 0 or done == lc.steps):
            flags = (mean_over_ranks(torch.tensor(flags, device=device), d) > 0).tolist()
        elif d.enabled:
            flags = [0.0, 0.0, 0.0]  # every rank skips the same steps, so all keep going together
        signalled = bool(flags[1])
        ckpt_due = bool(flags[2])
        time_up = bool(flags[0]) or signalled
        last_step = done == lc.steps or time_up

        if done % lc.log_every == 0 or last_step:
            keys = sorted(sums)
            values = mean_over_ranks(torch.stack([sums[k] / n_logs[k] for k in keys]), d).tolist()
            record = {"step": done, "time": time.time(), **dict(zip(keys, values)),
                      "samples_per_s": samples * d.world_size / max(busy, 1e-9)}
            record.update({f"lr/{k}": o.param_groups[0]["lr"] for k, o in optims.items()})
            sums.clear(), n_logs.clear()
            samples, busy = 0, 0.0
            if log is not None:
                log.write(record)
                losses = {k.split("/")[0]: f"{v:.4g}" for k, v in record.items() if k.endswith("/loss")}
                bar.set_postfix(**losses, sps=f"{record['samples_per_s']:.1f}")
        # not at a max_minutes stop: evaluation reseeds RNGs, and a paused run must continue exactly
        # as an uninterrupted one would
        if lc.eval_every and (done % lc.eval_every == 0 or done == lc.steps):
            for net in wrapped.values():
                net.eval()
            with ExitStack() as swaps:
                for net_name, (owner, e, ema) in emas.items():  # score what the export will carry
                    if counts[owner] >= e.start_step:
                        swaps.enter_context(ema.swapped_in(nets[net_name]))
                with torch.no_grad(), ctx.autocast():
                    metrics = objective.evaluate(done, wrapped, eval_batches())
            for k in trainable:
                wrapped[k].train()
            if log is not None and metrics:
                log.write({"step": done, **{f"eval/{k}": float(v) for k, v in metrics.items()}})
                bar.write(f"step {done}: " + ", ".join(f"{k} {float(v):.4g}" for k, v in metrics.items()))
        if done % lc.ckpt_every == 0 or last_step or ckpt_due:
            checkpoint(done)
            last_ckpt = time.perf_counter()
        if time_up:
            why = "stop requested" if signalled else f"max_minutes={lc.max_minutes:g} reached"
            bar.write(f"{why} at step {done}/{lc.steps}: exporting; rerun the same command to go on")
            break
    bar.close()

    # ----- export (EMA weights where there is an EMA that has started) -----
    final = {}
    for name, net in nets.items():
        ema = emas.get(name)
        started = ema is not None and counts[ema[0]] >= ema[1].start_step
        final[name] = gather_full(ema[2].shadow) if started else full_state_dict(net)
    if d.rank == 0:
        export(objective, final, eval_batches(), run_dir, cfg,
               {"steps": done, "of": lc.steps, "seconds": trained["seconds"]})  # the same clock as the resume
        plot_metrics(log.read(), run_dir / "metrics.png")
    barrier(d)
    if signalled:  # any rank's signal stops every rank
        raise Stopped(stop.signum or signal.SIGTERM, done)
    return run_dir


# ----- helpers, written once -------------------------------------------------------------------


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

