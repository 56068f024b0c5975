"""`python -m train.eval`: score world checkpoints on held-out recorded episodes.

    python -m train.eval checkpoint=<world.safetensors> data=<dataset dir> [out=<dir>]
        [episodes=N] [starts=4] [horizons=1,4,16,64] [steps=K] [sampler=few_step|euler]
        [cfg_scale=S] [protocol=auto|engine|joint] [rollout=1000] [drift_contexts=4] [drift_world=true]
        [game_rollout=600] [game_contexts=8] [play_rollout=1000] [videos=4] [batch=16] [probe_steps=1000]
        [device=auto|cpu|cuda] [dtype=auto|float32|bfloat16] [seed=0]
    python -m train.eval checkpoints=[a.safetensors,b.safetensors] names=[teacher,dmd-1] \\
        steps=[50,1] sampler=[euler,few_step] data=<dataset dir> out=<dir>

Held-out episodes: the last 10% of the dataset's episodes by sorted id (at least one); see
`train/eval/split.py`. Per checkpoint: fidelity vs horizon (PSNR, SSIM, dynamic-region PSNR)
beside the repeat-last and mean-frame baselines, Δ-PSNR (against the future actions shuffled in
time and against another held-out clip's actions) and the inverse-dynamics probe, drift over
long random-action rollouts (`rollout` frames from each of `drift_contexts` held-out contexts and
from each real context clip the world carries for its resets, pooled), speed, and for games with a
screen reader (Breakout) the game-behaviour check (`train/eval/game.py`): `game_rollout` frames
played closed-loop by the data's own controller from `game_contexts` held-out contexts and every
reset clip, game events counted against the held-out episodes (`game_rollout=0` skips it); for
first-person worlds the play check (`train/eval/play_check.py`): `play_rollout` frames of seeded
player-like key bursts from the same contexts, the view's uniformity, colour, sharpness and a
turn-back test against the held-out episodes' real frames (`play_rollout=0` skips it). `steps`,
`sampler`, `cfg_scale` and `protocol` take one value for all checkpoints or a list with one per
checkpoint; unset, each world's own engine defaults apply. The bidirectional teacher (a world
whose info says stage "teacher") is scored with the joint protocol (`train/eval/rollout.py`),
every other model through the engine.

Output (out, default `<first checkpoint's dir>/eval`): one checkpoint -> metrics.json, plots,
samples/*.mp4, table.md/json; several -> the same per checkpoint under out/<name>/ and one
table.md, table.json and plot set for all. Bad input exits 2 with one line, no traceback.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from train import UsageError
from train.eval import report
from train.eval.game import BRICK_AFTER, game_check
from train.eval.play_check import TURN_FRAMES, play_check
from train.eval.probe import ProbeConfig
from train.eval.reference import load_reference
from train.eval.rollout import PROTOCOLS, make_rollout, pick_protocol
from train.eval.score import drift_contexts, score, world_contexts
from train.eval.split import HELD_OUT_FRACTION, held_out_clips, open_dataset, split_dirs
from train.loop import WALLCLOCK
from worldmodel import diffusion
from worldmodel.checkpoint import CheckpointError, load_world, read_config
from worldmodel.dit import DiTConfig
from worldmodel.engine import EngineConfig

PER_CHECKPOINT = ("steps", "sampler", "cfg_scale", "protocol")


@dataclass
class EvalConfig:
    checkpoints: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    data: str | None = None
    out: str | None = None
    episodes: int = 0                 # held-out episodes used (0 = all)
    starts: int = 4                   # clips per held-out episode
    horizons: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    steps: list[int] = field(default_factory=list)          # per checkpoint, or one for all
    sampler: list[str] = field(default_factory=list)
    cfg_scale: list[float] = field(default_factory=list)
    protocol: list[str] = field(default_factory=list)
    rollout: int = 1000               # frames of each drift rollout
    drift_contexts: int = 4           # drift rollouts, from held-out clips spread over the set ...
    drift_world: bool = True          # ... and one from each real context clip the world carries
    game_rollout: int = 600           # frames of each game-behaviour rollout (0: no game check)
    game_contexts: int = 8            # held-out contexts of the game and play checks (+ the reset clips)
    play_rollout: int = 1000          # frames of each play-check rollout, first-person worlds (0: none)
    videos: int = 4                   # sample videos per checkpoint
    batch: int = 16                   # clips generated together
    probe_steps: int = 1000
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0


# ----- the command line ---------------------------------------------------------------------------

def _list(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return [t.strip().strip("'\"") for t in text.split(",") if t.strip()]


def parse_args(argv: list[str]) -> EvalConfig:
    cfg = EvalConfig()
    known = {f.name for f in fields(EvalConfig)} | {"checkpoint"}
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq:
            raise UsageError(f"arguments must be key=value, got {arg!r}; see python -m train.eval --help")
        if key not in known:
            raise UsageError(f"unknown option {key!r}; options: {sorted(known)}")
        try:
            if key in ("checkpoint", "checkpoints"):
                cfg.checkpoints = _list(value)
            elif key in ("names", "sampler", "protocol"):
                setattr(cfg, key, _list(value))
            elif key in ("horizons", "steps"):
                setattr(cfg, key, [int(v) for v in _list(value)])
            elif key == "cfg_scale":
                cfg.cfg_scale = [float(v) for v in _list(value)]
            elif key == "drift_world":
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                cfg.drift_world = value.lower() in ("true", "1")
            elif key in ("episodes", "starts", "rollout", "drift_contexts", "videos", "batch", "probe_steps",
                         "seed", "game_rollout", "game_contexts", "play_rollout"):
                setattr(cfg, key, int(value))
            else:
                setattr(cfg, key, value)
        except ValueError:
            raise UsageError(f"bad value for {key}: {value!r}") from None
    if not cfg.checkpoints:
        raise UsageError("no checkpoint given: pass checkpoint=<world.safetensors> "
                         "(or checkpoints=[a,b,...])")
    if not cfg.data:
        raise UsageError("no dataset given: pass data=<dataset dir> "
                         "(a directory written by `python -m record`)")
    if not cfg.horizons or min(cfg.horizons) < 1:
        raise UsageError(f"horizons must be positive frame counts, got {cfg.horizons}")
    cfg.horizons = sorted(set(cfg.horizons))
    if cfg.names and len(cfg.names) != len(cfg.checkpoints):
        raise UsageError(f"{len(cfg.names)} names for {len(cfg.checkpoints)} checkpoints")
    for key in PER_CHECKPOINT:
        n = len(getattr(cfg, key))
        if n not in (0, 1, len(cfg.checkpoints)):
            raise UsageError(f"{key} has {n} values for {len(cfg.checkpoints)} checkpoints: "
                             "give one, or one each")
    if any(s not in ("few_step", "euler") for s in cfg.sampler):
        raise UsageError(f"sampler must be few_step or euler, got {cfg.sampler}")
    if any(p not in PROTOCOLS for p in cfg.protocol):
        raise UsageError(f"protocol must be one of {PROTOCOLS}, got {cfg.protocol}")
    if cfg.rollout < 2 or cfg.starts < 1 or cfg.batch < 1 or cfg.drift_contexts < 1:
        raise UsageError("rollout must be >= 2, starts, batch and drift_contexts >= 1")
    if cfg.game_rollout < 0 or (cfg.game_rollout and cfg.game_rollout < 2 * BRICK_AFTER) or cfg.game_contexts < 1:
        raise UsageError(f"game_rollout must be 0 (off) or >= {2 * BRICK_AFTER} frames, game_contexts >= 1")
    if cfg.play_rollout < 0 or (cfg.play_rollout and cfg.play_rollout < 4 * TURN_FRAMES):
        raise UsageError(f"play_rollout must be 0 (off) or >= {4 * TURN_FRAMES} frames (1000 or more is the "
                         "check's own length)")
    return cfg


def _pick(values: list, i: int):
    return values[i] if len(values) > 1 else (values[0] if values else None)


def default_names(paths: list[str]) -> list[str]:
    """`runs/<stage>/export/world.safetensors` -> `<stage>`, else the file stem; made unique."""
    out: list[str] = []
    for p in map(Path, paths):
        base = p.parent.parent.name if p.parent.name == "export" else p.stem
        name, k = base, 2
        while name in out:
            name, k = f"{base}-{k}", k + 1
        out.append(name)
    return out


def engine_config(world_engine: dict, cfg: EvalConfig, i: int, device: str) -> EngineConfig:
    """The world's engine defaults with this checkpoint's overrides; first-frame steps follow the
    sampler (a few-step list of 1/2/4 for students, the full step count for Euler)."""
    over = {k: _pick(getattr(cfg, k), i) for k in ("steps", "sampler", "cfg_scale")}
    d = {**world_engine, **{k: v for k, v in over.items() if v is not None}, "device": device}
    if cfg.dtype != "auto" or "dtype" not in world_engine:
        d["dtype"] = cfg.dtype
    try:
        ec = EngineConfig.from_dict(d)
    except ValueError as e:
        raise UsageError(f"checkpoint {i + 1}: {e}") from None
    if ec.sampler == "euler" and over["steps"] is not None:
        ec.first_frame_steps = ec.steps
    elif ec.sampler == "few_step" and ec.first_frame_steps not in diffusion.STEP_COUNTS:
        ec.first_frame_steps = diffusion.FIRST_FRAME_NUM_STEPS
    if ec.sampler == "few_step" and ec.steps not in diffusion.STEP_COUNTS:
        raise UsageError(f"the few_step sampler runs {diffusion.STEP_COUNTS} steps, got steps={ec.steps}; "
                         f"use sampler=euler for more")
    return ec


def context_length(config: dict, ec: EngineConfig, protocol: str) -> int:
    """Real context frames a checkpoint uses, from its config alone (no weights loaded)."""
    dit = DiTConfig(**config["dit"])
    if protocol == "joint":
        return max(1, dit.train_frames // 2)
    k = dit.frames_per_block
    sink = -(-ec.sink // k) * k
    window = ec.window if ec.window is not None else (dit.train_frames - sink - k) // k * k
    return sink + window


# ----- evaluation -----------------------------------------------------------------------------------

def evaluate(cfg: EvalConfig) -> Path:
    t_start = time.perf_counter()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if device == "cpu":
        torch.set_flush_denormal(True)  # as training does: denormal floats make CPU convs crawl
    if not Path(cfg.data).is_dir():
        raise UsageError(f"dataset directory {cfg.data} does not exist: record one with "
                         f"`python -m record collect ...`, or fix data=<dataset dir>")
    configs = [read_config(p) for p in cfg.checkpoints]  # missing/damaged files fail here, before any work
    names = cfg.names or default_names(cfg.checkpoints)
    if len(set(names)) != len(names):
        raise UsageError(f"names must be unique, got {names}")
    out = Path(cfg.out) if cfg.out else Path(cfg.checkpoints[0]).resolve().parent / "eval"
    out.mkdir(parents=True, exist_ok=True)

    plans = []
    for i, (path, conf) in enumerate(zip(cfg.checkpoints, configs)):
        ec = engine_config(dict(conf.get("engine") or {}), cfg, i, device)
        requested = _pick(cfg.protocol, i) or "auto"
        protocol = requested if requested != "auto" else (
            "joint" if (conf.get("info") or {}).get("stage") == "teacher" else "engine")
        plans.append((path, names[i], ec, protocol, int(conf["tokenizer"]["image_size"])))
    context = max(context_length(c, p[2], p[3]) for c, p in zip(configs, plans))
    horizon = max(cfg.horizons)

    dataset = open_dataset(cfg.data)
    train_dirs, held_dirs = split_dirs(dataset)
    data_names = next((dataset.meta(d).get("action_names") for d in train_dirs + held_dirs
                       if dataset.meta(d).get("action_names")), None)
    loaded: dict[int, tuple] = {}  # resolution -> (clips, pieces, reference)

    def data_at(res: int, num_actions: int):
        if res not in loaded:
            clips, pieces = held_out_clips(dataset, held_dirs, res, context, horizon, cfg.starts,
                                           cfg.episodes or None)
            probe = ProbeConfig(num_actions=len(data_names) if data_names else num_actions, resolution=res,
                                steps=cfg.probe_steps, seed=cfg.seed)
            ref = load_reference(dataset, train_dirs, held_dirs, res, probe, out, device)
            loaded[res] = (clips, pieces, ref)
        return loaded[res]

    results, rows = {}, []
    multi = len(plans) > 1
    for path, name, ec, protocol, res in plans:
        t0 = time.perf_counter()
        world = load_world(path)
        clips, pieces, ref = data_at(res, len(world.action_names))
        if clips.actions.max() >= len(world.action_names):
            raise UsageError(f"the recorded actions go up to {int(clips.actions.max())}, but {path} knows "
                             f"{len(world.action_names)} actions ({world.action_names}): evaluate it on the "
                             f"dataset it was trained on")
        if data_names and list(data_names) != list(world.action_names):
            print(f"warning: {name}: the dataset's action names {data_names} differ from the world's "
                  f"{world.action_names}", file=sys.stderr)
        try:
            ro = make_rollout(world, ec, pick_protocol(world, protocol))
        except ValueError as e:
            raise UsageError(f"{path}: {e}") from None
        scored = score(world, ro, clips, ref, cfg.horizons, cfg.rollout, cfg.seed, cfg.batch, pieces,
                       torch.device(device), contexts=cfg.drift_contexts, world_clips=cfg.drift_world)
        m = {"name": name, "checkpoint": str(path), "sampler": ec.sampler, "steps": ec.steps,
             "first_frame_steps": ec.first_frame_steps, "cfg_scale": ec.cfg_scale, "device": device,
             "stage": world.info.get("stage"), **scored.metrics,
             "split": {"rule": f"last max(1, ceil({HELD_OUT_FRACTION} * n)) episodes by sorted id",
                       "held_out": [d.name for d in held_dirs], "training_episodes": len(train_dirs),
                       "held_out_is_training": held_dirs == train_dirs,
                       "clips": sorted(set(clips.episode))},
             "reference": {"path": str(ref.path), "probe_pairs": ref.pairs, "frames": ref.frames},
             "training": training_cost(path, world.info)}
        game = play = None
        contexts = game_contexts(world, clips, ro.context, cfg.game_contexts)  # both checks start from these
        if cfg.game_rollout:
            game = game_check(world, ro, pieces, contexts, cfg.game_rollout, cfg.seed)
        m["game"] = None if game is None else {k: v for k, v in game.items() if k != "frames"}
        if cfg.play_rollout:
            play = play_check(world, ro, pieces, contexts, cfg.play_rollout, cfg.seed)
        m["play"] = None if play is None else {k: v for k, v in play.items() if k != "frames"}
        m["seconds"] = time.perf_counter() - t0
        target = out / name if multi else out
        report.write_json(target / "metrics.json", m)
        write_samples(target / "samples", clips, scored, ro.context, world.action_names, cfg.videos)
        for kind, check in (("game", game), ("play", play)):
            for i, frames in enumerate((check or {}).get("frames", [])[:cfg.videos]):
                report.write_video(target / "samples" / f"{kind}_{i}.mp4", None, frames,
                                   [f"{t + 1}" for t in range(len(frames))], titles=("", "played"))
        report.horizon_plots({name: m}, target)
        results[name] = m
        rows.append(report.table_row(name, m))
        h = str(cfg.horizons[0])
        print(f"evaluate: {name}: PSNR@{h} {m['fidelity'][h]['psnr']:.2f} dB, {m['seconds']:.1f} s",
              file=sys.stderr)
    if multi:
        report.horizon_plots(results, out)
    report.write_json(out / "table.json", {"rows": rows, "horizons": cfg.horizons,
                                           "seconds": time.perf_counter() - t_start})
    (out / "table.md").write_text(report.markdown_table(rows, cfg.horizons) + report.game_table(rows)
                                 + report.play_table(rows))
    return out


def game_contexts(world, clips, context: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` held-out contexts spread over the clips, and every reset clip the world carries."""
    idx = drift_contexts(len(clips), n)
    frames, actions = clips.context_frames(context)[idx], clips.context_actions(context)[idx]
    own = world_contexts(world, context)
    if own is not None:
        frames, actions = np.concatenate([frames, own[0]]), np.concatenate([actions, own[1]])
    return frames, actions


def training_cost(path: Path, info: dict | None = None) -> dict | None:
    """The stage's own training wall-clock, from the ``wallclock.json`` its export holds, else from
    what `train.assemble` copied into the world's info (None for a world with neither)."""
    f = Path(path).parent / WALLCLOCK
    if f.is_file():
        return json.loads(f.read_text())
    return (info or {}).get("stage_wallclock")


def write_samples(out: Path, clips, scored, context: int, names: list[str], n: int) -> None:
    """real | generated for the first ``n`` clips (context frames first, shown on both sides), and the
    drift rollout alone."""
    for i in range(min(n, len(clips))):
        ctx = clips.frames[i, clips.context - context:clips.context]
        real = np.concatenate([ctx, clips.future_frames[i]])
        gen = np.concatenate([ctx, scored.generated[i]])
        acts = np.concatenate([clips.context_actions(context)[i], clips.future_actions[i]])
        caps = [("ctx " if t < context else f"+{t - context + 1} ") + report.action_name(names, int(a))
                for t, a in enumerate(acts)]
        report.write_video(out / f"sample_{i}.mp4", real, gen, caps)
    caps = [f"{t + 1} {report.action_name(names, int(a))}" for t, a in enumerate(scored.drift_actions)]
    report.write_video(out / "drift.mp4", None, scored.drift_frames, caps, titles=("", "rollout"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        out = evaluate(parse_args(argv))
    except (UsageError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    print(f"done: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
