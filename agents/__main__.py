"""python -m agents: train an agent inside a world model, score it in the real game.

    python -m agents train --world breakout --out runs/agent --minutes 60   # resumable: rerun to go on
    python -m agents score --out runs/agent --episodes 20                   # agent vs random, real game

Needs stable-baselines3 (`pip install -e ".[agents]"`) and the real game for scoring (`.[atari]`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from agents.train import AGENT, AgentConfig


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agents", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="PPO inside a world (resumable, time-boxed)")
    defaults = AgentConfig(out="")
    for f in fields(AgentConfig):
        if f.name == "out":
            t.add_argument("--out", required=True, help="directory for the agent, its log and plot")
            continue
        value = getattr(defaults, f.name)
        t.add_argument("--" + f.name.replace("_", "-"), type=type(value), default=value,
                       help=f"default {value}")
    t.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    s = sub.add_parser("score", help="score a trained agent and a random policy in the real game")
    s.add_argument("--out", required=True, help="the agent's directory (from `train`)")
    s.add_argument("--episodes", type=int, default=20)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--deterministic", action="store_true", help="greedy actions instead of sampled")
    return p


def check(cfg: AgentConfig) -> None:
    for name in ("minutes", "checkpoint_minutes", "lr", "gamma"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in ("envs", "horizon", "frame_stack", "n_steps", "batch_size", "epochs", "final_episodes",
                 "real_max_steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.real_episodes < 0:
        raise ValueError(f"--real-episodes must be >= 0, got {cfg.real_episodes}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        import stable_baselines3  # noqa: F401
    except ImportError:
        print('error: agents need stable-baselines3: pip install -e ".[agents]"', file=sys.stderr)
        return 2
    import torch

    try:
        if args.command == "train":
            if args.threads:
                torch.set_num_threads(args.threads)
            cfg = AgentConfig(**{f.name: getattr(args, f.name) for f in fields(AgentConfig)})
            check(cfg)
            from agents.train import train

            result = train(cfg)
        else:
            result = score_saved(Path(args.out), args.episodes, args.seed, args.deterministic)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted (the newest checkpoint is kept)", file=sys.stderr)
        return 130
    a, r = result["agent"], result["random"]
    print(f"{result['game']}: agent {a['mean']:.2f} ± {a['std']:.2f}, random {r['mean']:.2f} ± {r['std']:.2f} "
          f"over {len(a['returns'])} real games ({result.get('timesteps', 0):,} imagined steps)")
    return 0


def score_saved(out: Path, episodes: int, seed: int, deterministic: bool) -> dict:
    from stable_baselines3 import PPO

    from agents.real_game import score

    if not (out / AGENT).is_file() or not (out / "config.json").is_file():
        raise FileNotFoundError(f"{out} holds no trained agent ({AGENT} and config.json): train one with "
                                f"`python -m agents train --out {out}`")
    if episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {episodes}")
    conf = json.loads((out / "config.json").read_text())
    model = PPO.load(out / AGENT, device="cpu")
    size = tuple(conf["frame_size"])
    result = {"game": conf["game"], "timesteps": int(model.num_timesteps),
              **score(model, conf["game"], size, None, conf["frame_stack"], episodes, seed, deterministic,
                       max_steps=conf.get("real_max_steps", 10_000))}
    (out / "score.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(main())
