"""`python -m train stage=all ...`: the whole Causal Forcing++ pipeline in one command.

tokenizer -> teacher -> ar -> causal_cd [-> causal_ode] -> dmd -> rewards, each stage a normal run
of the one loop (so each resumes on its own: rerunning the command skips finished stages and
continues an interrupted one), each initialised from the previous stage's export under the same
``runs_root``. The final artefact is one world checkpoint, ``<runs_root>/world.safetensors``: the
DMD student with the reward heads attached, the dataset's action names, keymap, game and fps, and
real context frames, so ``play.py --checkpoint`` and the env load it with nothing else.

Every override on the command line goes to every stage (``max_steps=5`` makes a smoke run);
``stage.max_steps.<name>=N`` sets one stage's length; ``<name>.<key>=V`` sets one stage's own option
(``dmd.ema_start=50`` becomes ``stage.ema_start=50`` for the dmd stage only);
``stage.causal_ode=true`` adds the baseline.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig

from train import UsageError
from train.assemble import assemble_world
from train.loop import WALLCLOCK
from train.objectives._dit import WORLD

ORDER = ("tokenizer", "teacher", "ar", "causal_cd", "causal_ode", "dmd", "rewards")


def split_stage_options(argv: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(overrides for every stage, {stage: its own ``stage.<key>=V`` overrides}) from a command
    line where ``<stage>.<key>=V`` addresses one stage."""
    common: list[str] = []
    own: dict[str, list[str]] = {}
    for a in argv:
        head, dot, rest = a.partition(".")
        if dot and head in ORDER and "=" in rest:
            own.setdefault(head, []).append(f"stage.{rest}")
        else:
            common.append(a)
    return common, own


def stage_overrides(argv: list[str], name: str, cfg: DictConfig,
                    own: dict[str, list[str]] | None = None) -> list[str]:
    """The command line for one stage: the user's overrides, its name, its own step count and
    options."""
    out = [a for a in argv if not a.startswith(("stage=", "stage."))]
    out.append(f"stage={name}")
    out += (own or {}).get(name, [])
    steps = (cfg.stage.get("max_steps") or {}).get(name)
    if steps is not None and not any(a.startswith("max_steps=") for a in argv):
        out.append(f"max_steps={steps}")
    return out


def run_pipeline(argv: list[str], cfg: DictConfig, train_stage,
                 own: dict[str, list[str]] | None = None, compose_stage=None) -> Path | None:
    """Run the stages in order through ``train_stage(overrides) -> run_dir``; returns the world,
    or None when a stage paused at ``max_minutes`` (rerun to go on; later stages must not start
    from a half-trained export). ``own``: per-stage options (``split_stage_options``);
    ``compose_stage(overrides)``, when given, checks every stage's command line before any runs,
    so a typo in a late stage's option fails now, not hours later."""
    wanted = [s for s in ORDER if s != "causal_ode" or cfg.stage.get("causal_ode", False)]
    if cfg.data.get("source") == "synthetic" and "rewards" in wanted:
        wanted.remove("rewards")  # generated episodes carry no rewards to learn
    runs_root = Path(cfg.runs_root)
    timings: dict[str, float] = {}
    timing_file = runs_root / "pipeline_timings.json"
    if timing_file.exists():
        timings = json.loads(timing_file.read_text())
    unknown = sorted(set(own or {}) - set(wanted))
    if unknown:
        raise UsageError(f"options for stage(s) {unknown}, which this pipeline does not run "
                         f"(stages: {wanted}; causal_ode runs with stage.causal_ode=true)")
    commands = {name: stage_overrides(argv, name, cfg, own) for name in wanted}
    if compose_stage is not None:
        for overrides in commands.values():
            compose_stage(overrides)
    run_dirs: dict[str, Path] = {}
    for name in wanted:
        print(f"== stage {name}", flush=True)
        t0 = time.perf_counter()
        run_dirs[name] = Path(train_stage(commands[name]))
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
        runs_root.mkdir(parents=True, exist_ok=True)
        timing_file.write_text(json.dumps(timings, indent=2))
        done = json.loads((run_dirs[name] / "export" / WALLCLOCK).read_text())
        if done["steps"] < done["of"]:
            print(f"paused: stage {name} stopped at max_minutes after {done['steps']}/{done['of']} steps; "
                  f"rerun the same command to go on (later stages wait for it)", flush=True)
            return None
    rewards = run_dirs["rewards"] / "export" if "rewards" in run_dirs else None
    out = assemble_world(run_dirs["dmd"] / "export", runs_root / WORLD, cfg.data.get("path"), rewards,
                         cfg.get("world_name"), timings)
    print(f"world: {out}")
    return out
