"""The command line: `python -m train stage=<name> data=<dataset dir> model=<size> [key=value ...]`.

Configs are composed with hydra's Compose API (the same call tests use, in-process), not with
`@hydra.main`: nothing is written to the working directory (no `outputs/`, no chdir, no hydra
log files) and every output goes to `run_dir`. `data=<dir>` is short for `data.path=<dir>` when
`<dir>` is not one of the `data/` options (`recorded`, `synthetic`).
"""

from __future__ import annotations

import sys
from dataclasses import fields
from importlib.resources import files
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from episodes.reader import DatasetError
from train import UsageError
from train.interrupt import Stopped
from train.configs import register_stage_schemas
from train.help import describe
from train.loop import LoopConfig, loop_config, train
from train.objectives import available_stages, get_objective
from train.pipeline import run_pipeline, split_stage_options
from worldmodel.checkpoint import CheckpointError

USAGE = """usage: python -m train stage=<stage> data=<dataset dir | synthetic> model=<size> [key=value ...]

  stage   one of: {stages}
  data    a directory written by `python -m record`, or one of: {data}
  model   one of: {models}
  common overrides: max_steps=<n> (training updates) run_dir=<dir> runs_root=<dir> init_from=<export dir> device=cpu|cuda
                    dtype=auto|bf16|fp32 grad_accum=<n> ckpt_every=<n> ckpt_minutes=<m> eval_every=<n>
                    seed=<n> (a checkpoint every ckpt_every steps and at least every ckpt_minutes)
                    max_minutes=<m> (checkpoint + export after m minutes; rerun to go on)
  stage=all: stage.max_steps.<stage>=<n> sets one stage's length, <stage>.<key>=<v> one stage's option
             (e.g. dmd.ema_start=50 causal_ode.trajectories=256)
  --cfg   print the composed config and exit
Rerunning the same command resumes from the newest checkpoint in run_dir.
Multi-GPU: torchrun --nproc-per-node=<n> -m train ... (parallel=ddp|fsdp)."""


def options(group: str) -> list[str]:
    """The choices of one config group: the YAML files in train/configs/<group>/."""
    return sorted(p.name[:-5] for p in files("train.configs").joinpath(group).iterdir()
                  if p.name.endswith(".yaml") and not p.name.startswith("_"))  # _base: shared part


# Old spellings that still work, with a note naming the new key: `steps` was both the training
# length and (as stage.steps) DMD's denoising steps; training length is `max_steps` now.
RENAMED = {"steps": "max_steps", "stage.steps.": "stage.max_steps."}


def renamed(key: str) -> str | None:
    """The new spelling of an old config key, or None."""
    if key in RENAMED:
        return RENAMED[key]
    old = next((k for k in RENAMED if k.endswith(".") and key.startswith(k)), None)
    return RENAMED[old] + key[len(old):] if old else None


def rename_old_keys(overrides: list[str]) -> list[str]:
    """Old key spellings mapped to their new names, with a deprecation note on stderr."""
    out = []
    for o in overrides:
        key, eq, value = o.partition("=")
        new = renamed(key) if eq else None
        if new is not None:
            print(f"note: {key}= is now {new}= (training updates; `steps` is kept for denoising "
                  f"steps); the old name still works for now", file=sys.stderr)
            o = f"{new}={value}"
        out.append(o)
    return out


def normalize_overrides(overrides: list[str]) -> list[str]:
    """Check the group choices (naming the valid ones), expand `data=<dir>` to data.path and
    map old key spellings to their new names."""
    out = []
    for o in rename_old_keys(overrides):
        key, _, value = o.partition("=")
        if key in ("stage", "model") and value not in options(key):
            raise UsageError(f"unknown {key} {value!r}; choose one of {options(key)}, "
                             f"e.g. python -m train {key}={options(key)[0]} ...")
        if key == "data" and value not in options("data"):
            out.append(f"data.path={value}")
            continue
        out.append(o)
    return out


def check_stage_keys(overrides: list[str]) -> None:
    """A ``stage.<key>=`` the stage's dataclass does not have is a typo: say so and where the
    options are listed (hydra's own message would suggest ``+stage.<key>``, which only fails later)."""
    stage = next((o.partition("=")[2] for o in overrides if o.startswith("stage=")), None)
    if stage not in available_stages():  # stage=all routes stage.<key> itself; none given: hydra's check
        return
    known = {f.name for f in fields(get_objective(stage).Config)} | {"name"}
    for o in overrides:
        key = o.partition("=")[0]
        if key.startswith("stage.") and key.split(".")[1] not in known:
            raise UsageError(f"{key} is not an option of stage={stage}; "
                             f"`python -m train --help stage={stage}` lists them")


def compose_config(overrides: list[str]) -> DictConfig:
    """The composed, not yet resolved, config for these command-line overrides."""
    register_stage_schemas()
    overrides = normalize_overrides(overrides)
    check_stage_keys(overrides)
    try:
        with initialize_config_module(config_module="train.configs", version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise UsageError(f"bad override in {overrides}: {e}") from None


def print_help(argv: list[str]) -> int:
    """The usage, the loop's options and, with stage=<name>, every option of that stage."""
    print(USAGE.format(stages=options("stage"), data=options("data"), models=options("model")))
    print("\nloop options (top-level keys; defaults from the code, a stage's yaml may set others):")
    print(describe(LoopConfig))
    stage = next((a.partition("=")[2] for a in argv if a.startswith("stage=")), None)
    if stage is None or stage == "all":
        print("\n`python -m train --help stage=<stage>` lists that stage's options (stage.<key>=<v>); "
              "`python -m train stage=<stage> ... --cfg` prints the composed config a run would use")
        return 0
    try:
        cls = get_objective(stage).Config
    except (ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\nstage={stage} options (stage.<key>=<v>; defaults from the code, "
          f"train/configs/stage/{stage}.yaml may set others):")
    print(describe(cls, "stage."))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        return print_help([a for a in argv if a not in ("-h", "--help")])
    show = "--cfg" in argv
    argv = [a for a in argv if a != "--cfg"]
    try:
        bad = [a for a in argv if "=" not in a]
        if bad:
            raise UsageError(f"arguments must be key=value, got {bad}; see python -m train --help")
        argv = rename_old_keys(argv)
        own: dict[str, list[str]] = {}
        if "stage=all" in argv:  # <stage>.<key>=V options go to that stage only
            argv, own = split_stage_options(argv)
        cfg = compose_config(argv)
        if show:
            print(OmegaConf.to_yaml(cfg, resolve=True))
            return 0
        loop_config(cfg)  # steps=0, steps=abc, device=cuda without a GPU: say so before any work
        if cfg.stage.name == "all":
            world = run_pipeline(argv, cfg, lambda o: train(compose_config(o)), own,
                                 lambda o: loop_config(compose_config(o)))
            if world is not None:
                print(f"done: {world}")
            return 0
        run_dir = train(cfg)
    except (UsageError, CheckpointError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"\n{e}", file=sys.stderr)
        return 128 + e.signum  # the shell's code for that signal: a `&&` chain stops here
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume from the newest checkpoint", file=sys.stderr)
        return 130
    print(f"done: {Path(run_dir) / 'export'}")
    return 0
