"""The one training loop. Every stage runs through `train(cfg)`; what differs between stages is
the objective (`train/objectives/<stage>.py`), chosen by `cfg.stage.name`.

`_Run` holds one call of the loop, in named steps read top to bottom: setup (device, dtype,
process group, seeds) and data -> objective, networks, optimizers, EMAs -> resume -> the loop
(`update`: one optimizer update as the objective orders them, with gradient accumulation,
clipping and EMA; `agree` on stopping and time checkpoints; `log`, `evaluate`, `checkpoint`) ->
`export`. Rerunning the same command continues from the newest checkpoint and ends with the same
weights as a run that was never interrupted (bit-exact on CPU).
"""

from __future__ import annotations

import signal
import time
from collections import defaultdict
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from train import UsageError
from train.checkpoint import load_newest_readable, rng_state, save_checkpoint, set_aside, set_rng_state
from train.data import build_data, clip_batches
from train.distributed import (all_gather_object, barrier, full_state_dict, gather_full, init_distributed,
                               load_like, mean_over_ranks, no_sync, pick_dtype, wrap)
from train.ema import EMA, WARMED_UP
from train.interrupt import Stopped, StopRequest
from train.loop_config import LoopConfig, loop_config
from train.loop_state import (WALLCLOCK, build_objective, export, load_network, load_optimizer,
                              make_optimizer, opt_params, optimizer_state, seed_everything)
from train.metrics_log import MetricsLog, plot_metrics
from train.objectives import EMASpec, TrainContext

__all__ = ["LoopConfig", "WALLCLOCK", "build_objective", "loop_config", "train"]

EVAL_SEED_OFFSET = 7919  # evaluation/export batches come from their own stream, never the training one


def train(cfg: DictConfig) -> Path:
    """Run (or resume) the stage described by `cfg` to `cfg.max_steps`; returns the run directory.
    SIGTERM or Ctrl-C stop it at the end of a step with a checkpoint and the export, then raise
    `Stopped` (train/interrupt.py)."""
    with StopRequest() as stop:
        return _Run(cfg, stop).run()


class _Run:
    """One call of the loop on one process: what it built, and its steps."""

    def __init__(self, cfg: DictConfig, stop: StopRequest) -> None:
        self.cfg, self.stop = cfg, stop
        self.lc = lc = loop_config(cfg)
        self.d, self.device = d, device = init_distributed(lc.device)
        dtype = pick_dtype(lc.dtype, device)
        self.run_dir = run_dir = Path(cfg.run_dir)
        init_from = Path(cfg.init_from) if cfg.get("init_from") else None
        if init_from is not None and not init_from.exists():
            prev = init_from.parent.name if init_from.name == "export" else "<previous stage>"
            raise UsageError(
                f"stage {cfg.stage.name!r} starts from a previous stage's export, {init_from}, which does "
                f"not exist. Train that stage first (python -m train stage={prev} data=... "
                f"runs_root={cfg.runs_root}), or point init_from=<export dir> at one.")
        run_dir.mkdir(parents=True, exist_ok=True)
        self.ctx = ctx = TrainContext(device=device, dtype=dtype, rank=d.rank, world_size=d.world_size,
                                      run_dir=run_dir, init_from=init_from, seed=lc.seed,
                                      model=OmegaConf.to_container(cfg.model, resolve=True))

        # data first: the objective sizes its action embedding from the dataset's actions
        self.source = build_data(cfg.data, rank=d.rank, world_size=d.world_size, device=device, run_dir=run_dir)
        ctx.extra["action_names"] = list(self.source.action_names)
        ctx.extra["clip_len"] = int(cfg.data.clip_len)
        self.batches = clip_batches(self.source, cfg.data, seed=lc.seed, rank=d.rank, world_size=d.world_size,
                                    device=device)

        # Same seed on every rank while building: identical initial weights (FSDP does not broadcast).
        seed_everything(lc.seed)
        self.objective = build_objective(cfg.stage, ctx)
        self.nets = nets = {k: v.to(device) for k, v in self.objective.networks().items()}
        self.specs = specs = self.objective.optimizers()
        self.trainable = sorted({n for s in specs.values() for n in s.networks})
        for name, net in nets.items():
            if name not in self.trainable:
                net.requires_grad_(False).eval()  # frozen: no grads, no dropout
        self.wrapped = {k: wrap(v, lc.parallel, device, lc.find_unused_parameters) if k in self.trainable else v
                        for k, v in nets.items()}
        self.optims = {k: make_optimizer(s, nets) for k, s in specs.items()}
        self.scalers = {k: torch.amp.GradScaler(device.type, enabled=dtype == torch.float16) for k in specs}
        self.emas: dict[str, tuple[str, EMASpec, EMA]] = {
            e.network: (k, e, EMA(nets[e.network], e.decay)) for k, s in specs.items() for e in s.ema}
        self.counts: dict[str, int] = {k: 0 for k in specs}  # updates per optimizer (warm-up, EMA start)
        self.sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
        self.n_logs: dict[str, int] = defaultdict(int)
        self.samples, self.busy = 0, 0.0  # since the last log line; busy excludes evaluation and checkpoints

    def eval_batches(self):
        return clip_batches(self.source, self.cfg.data, seed=self.lc.seed + EVAL_SEED_OFFSET,
                            rank=self.d.rank, world_size=self.d.world_size, device=self.device)

    # ----- resume ---------------------------------------------------------------------------------
    def resume(self) -> int:
        """Load the newest readable checkpoint, if any; returns the step to start from."""
        d, lc = self.d, self.lc
        self.wall_before = 0.0
        path, ck, unreadable = load_newest_readable(self.run_dir)
        if path is None:
            seed_everything(lc.seed + d.rank)  # ranks draw different noise from here on
            return 0
        start = ck["step"]
        self.wall_before = float(ck.get("wall_seconds", 0.0))
        for name, net in self.nets.items():
            load_network(net, ck["networks"][name])
        for name, opt in self.optims.items():
            load_optimizer(opt, self.nets, self.specs[name], ck["optimizers"][name])
            self.scalers[name].load_state_dict(ck["scalers"][name])
        for name, (_, _, ema) in self.emas.items():
            for k, v in ck["ema"][name]["shadow"].items():
                load_like(ema.shadow[k], v)
            ema.updates = int(ck["ema"][name].get("updates", WARMED_UP))
        self.counts.update(ck["counts"])
        self.objective.load_state_dict(ck["objective"])
        if len(ck["rng"]) == d.world_size:
            self.batches.load_state_dict(ck["data"][d.rank])
            set_rng_state(ck["rng"][d.rank])
        else:  # another process count: shards differ anyway; keep the epoch, start fresh streams
            self.batches.load_state_dict(ck["data"][0])
            seed_everything(lc.seed + d.rank + 1_000 * start)
            if d.rank == 0:
                tqdm.write(f"warning: checkpoint written by {len(ck['rng'])} processes, resuming on "
                           f"{d.world_size}: weights continue exactly, data order and noise do not")
        barrier(d)  # every rank has read its checkpoint before rank 0 renames damaged ones
        if d.rank == 0:
            for bad, why in unreadable:
                tqdm.write(f"warning: checkpoint {bad} is unreadable ({why}); kept as {set_aside(bad).name}")
            older = "the newest readable checkpoint, " if unreadable else ""
            tqdm.write(f"resuming {self.run_dir} from {older}{path.name} (step {start})")
        return start

    # ----- one optimizer update -------------------------------------------------------------------
    def update(self, name: str, step: int) -> None:
        lc, spec, opt, scaler = self.lc, self.specs[name], self.optims[name], self.scalers[name]
        for o in self.optims.values():  # grads left by another network's update must not leak in
            o.zero_grad(set_to_none=True)
        for micro in range(lc.grad_accum):
            batch = next(self.batches)
            last = micro == lc.grad_accum - 1
            sync = nullcontext() if last else no_sync([self.wrapped[n] for n in self.trainable])
            with sync:
                with self.ctx.autocast():
                    loss, logs = self.objective.loss(name, batch, step, self.wrapped)
                scaler.scale(loss / lc.grad_accum).backward()
            self.samples += batch.batch_size[0]
            for k, v in {"loss": loss, **logs}.items():
                self._log_value(f"{name}/{k}", torch.as_tensor(v, device=self.device).detach().float())
        for g in opt.param_groups:  # linear warm-up, counted in this optimizer's own updates
            g["lr"] = spec.lr * min(1.0, (self.counts[name] + 1) / max(1, spec.warmup_steps))
        scaler.unscale_(opt)
        skip = False
        if spec.grad_clip is not None or spec.skip_grad_norm is not None:
            # clip_grad_norm_ returns the norm before clipping; inf max_norm measures only.
            clip = spec.grad_clip if spec.grad_clip is not None else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(opt_params(opt), clip)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            self._log_value(f"{name}/grad_norm", norm.detach().float())
            if spec.skip_grad_norm is not None:
                # grads are already all-reduced, so every rank reads the same norm and agrees
                skip = not bool(torch.isfinite(norm)) or float(norm) >= spec.skip_grad_norm
                self._log_value(f"{name}/skipped", float(skip))
        if skip:
            opt.zero_grad(set_to_none=True)
            scaler.update()
            return
        scaler.step(opt)
        scaler.update()
        self.counts[name] += 1
        for net_name, (owner, e, ema) in self.emas.items():
            # After `start_step` updates the EMA restarts from the live weights, then averages.
            if owner == name and self.counts[name] == e.start_step:
                ema.reset(self.nets[net_name])
            elif owner == name and self.counts[name] > e.start_step:
                ema.update(self.nets[net_name])
        self.objective.after_update(name)

    def _log_value(self, key: str, value) -> None:
        self.sums[key] += value
        self.n_logs[key] += 1

    # ----- what every rank must agree on ----------------------------------------------------------
    def agree(self, done: int, t_start: float, last_ckpt: float) -> tuple[bool, bool, bool]:
        """(time up, signalled, time checkpoint due), the same on every rank.

        The run stops when any rank's clock is past the deadline or any rank was sent a signal
        (torchrun forwards SIGTERM to every worker). The all-reduce waits for the device, so
        without a deadline ranks compare notes only at log steps (which sync anyway): a signal is
        then honoured within log_every steps. The checkpoint clock is agreed on the same way (a
        checkpoint is collective): under several processes a time checkpoint comes within
        log_every steps of being due."""
        lc, d = self.lc, self.d
        now = time.perf_counter()
        flags = [float(lc.max_minutes > 0 and now - t_start > 60 * lc.max_minutes),
                 float(self.stop.signum is not None),
                 float(lc.ckpt_minutes > 0 and now - last_ckpt >= 60 * lc.ckpt_minutes)]
        if d.enabled and (lc.max_minutes > 0 or done % lc.log_every == 0 or done == lc.max_steps):
            flags = (mean_over_ranks(torch.tensor(flags, device=self.device), d) > 0).tolist()
        elif d.enabled:
            flags = [0.0, 0.0, 0.0]  # every rank skips the same steps, so all keep going together
        return bool(flags[0]) or bool(flags[1]), bool(flags[1]), bool(flags[2])

    # ----- logs, evaluation, checkpoints ----------------------------------------------------------
    def log(self, done: int, bar: tqdm, log: MetricsLog | None) -> None:
        keys = sorted(self.sums)
        values = mean_over_ranks(torch.stack([self.sums[k] / self.n_logs[k] for k in keys]), self.d).tolist()
        record = {"step": done, "time": time.time(), **dict(zip(keys, values)),
                  "samples_per_s": self.samples * self.d.world_size / max(self.busy, 1e-9)}
        record.update({f"lr/{k}": o.param_groups[0]["lr"] for k, o in self.optims.items()})
        self.sums.clear(), self.n_logs.clear()
        self.samples, self.busy = 0, 0.0
        if log is not None:
            log.write(record)
            losses = {k.split("/")[0]: f"{v:.4g}" for k, v in record.items() if k.endswith("/loss")}
            bar.set_postfix(**losses, sps=f"{record['samples_per_s']:.1f}")

    def evaluate(self, done: int, bar: tqdm, log: MetricsLog | None) -> None:
        for net in self.wrapped.values():
            net.eval()
        with ExitStack() as swaps:
            for net_name, (owner, e, ema) in self.emas.items():  # score what the export will carry
                if self.counts[owner] >= e.start_step:
                    swaps.enter_context(ema.swapped_in(self.nets[net_name]))
            with torch.no_grad(), self.ctx.autocast():
                metrics = self.objective.evaluate(done, self.wrapped, self.eval_batches())
        for k in self.trainable:
            self.wrapped[k].train()
        if log is not None and metrics:
            log.write({"step": done, **{f"eval/{k}": float(v) for k, v in metrics.items()}})
            bar.write(f"step {done}: " + ", ".join(f"{k} {float(v):.4g}" for k, v in metrics.items()))

    def checkpoint(self, step: int, seconds: float, log: MetricsLog | None) -> None:
        d = self.d
        state = {
            "step": step,
            "wall_seconds": seconds,
            "networks": {k: full_state_dict(v) for k, v in self.nets.items()},
            "optimizers": {k: optimizer_state(o, self.nets, self.specs[k]) for k, o in self.optims.items()},
            "scalers": {k: s.state_dict() for k, s in self.scalers.items()},
            "ema": {k: {"decay": e.decay, "updates": e.updates, "shadow": gather_full(e.shadow)}
                    for k, (_, _, e) in self.emas.items()},
            "counts": dict(self.counts),
            "objective": self.objective.state_dict(),
            "rng": all_gather_object(rng_state(), d),
            "data": all_gather_object(self.batches.state_dict(), d),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }
        if d.rank == 0:
            save_checkpoint(state, self.run_dir, self.lc.keep_ckpts)
            plot_metrics(log.read(), self.run_dir / "metrics.png")
        barrier(d)

    def export(self, done: int, seconds: float, log: MetricsLog | None) -> None:
        """EMA weights where there is an EMA that has started, else the live ones."""
        final = {}
        for name, net in self.nets.items():
            ema = self.emas.get(name)
            started = ema is not None and self.counts[ema[0]] >= ema[1].start_step
            final[name] = gather_full(ema[2].shadow) if started else full_state_dict(net)
        if self.d.rank == 0:
            export(self.objective, final, self.eval_batches(), self.run_dir, self.cfg,
                   {"steps": done, "of": self.lc.max_steps, "seconds": seconds})
            plot_metrics(log.read(), self.run_dir / "metrics.png")
        barrier(self.d)

    # ----- the loop -------------------------------------------------------------------------------
    def run(self) -> Path:
        lc, d = self.lc, self.d
        start = self.resume()
        if d.rank == 0:
            OmegaConf.save(self.cfg, self.run_dir / "config.yaml", resolve=True)
        log = MetricsLog(self.run_dir / "metrics.jsonl", resume_step=start if start else None) \
            if d.rank == 0 else None
        bar = tqdm(total=lc.max_steps, initial=start, disable=d.rank != 0 or not lc.progress, dynamic_ncols=True)
        seconds = self.wall_before  # loop time up to the newest checkpoint, summed over calls
        t_start = time.perf_counter()
        last_ckpt = t_start  # when the newest checkpoint was written (resume: as good as now)
        done, signalled = start, False
        for step in range(start, lc.max_steps):
            t_step = time.perf_counter()
            for name in self.objective.updates(step):
                self.update(name, step)
            done = step + 1
            self.busy += time.perf_counter() - t_step
            bar.update(1)
            time_up, signalled, ckpt_due = self.agree(done, t_start, last_ckpt)
            last_step = done == lc.max_steps or time_up
            if done % lc.log_every == 0 or last_step:
                self.log(done, bar, log)
            # not at a max_minutes stop: evaluation reseeds RNGs, and a paused run must continue
            # exactly as an uninterrupted one would
            if lc.eval_every and (done % lc.eval_every == 0 or done == lc.max_steps):
                self.evaluate(done, bar, log)
            if done % lc.ckpt_every == 0 or last_step or ckpt_due:
                seconds = self.wall_before + time.perf_counter() - t_start
                self.checkpoint(done, seconds, log)
                last_ckpt = time.perf_counter()
            if time_up:
                why = "stop requested" if signalled else f"max_minutes={lc.max_minutes:g} reached"
                bar.write(f"{why} at step {done}/{lc.max_steps}: exporting; rerun the same command to go on")
                break
        bar.close()
        self.export(done, seconds, log)  # the same clock as the resume
        if signalled:  # any rank's signal stops every rank
            raise Stopped(self.stop.signum or signal.SIGTERM, done)
        return self.run_dir
