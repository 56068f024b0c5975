"""PPO inside a world model: the training loop, its checkpoints, log and plot.

Time-boxed (``minutes``) and resumable: the agent, its optimiser and the step count are saved
every ``checkpoint_minutes`` and at the end, and running the same command again goes on from the
newest save. Every save also appends the dream's mean episode return to ``log.jsonl``; with
``real_episodes > 0`` each save is scored in the real game too, and ``score.png`` plots both.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

AGENT, STATE, LOG = "agent.zip", "state.json", "log.jsonl"


@dataclass
class AgentConfig:
    out: str
    world: str = "breakout"        # a shipped world's name or a world .safetensors
    minutes: float = 60.0          # training budget, all resumed runs together
    envs: int = 16                 # imagined worlds stepped together (one batched engine forward)
    horizon: int = 500             # imagined steps before a world is truncated and reset
    frame_stack: int = 4           # frames the policy sees (the ball's velocity needs more than one)
    n_steps: int = 128             # PPO rollout length per world
    batch_size: int = 256
    epochs: int = 4
    lr: float = 2.5e-4
    ent_coef: float = 0.01
    gamma: float = 0.99
    checkpoint_minutes: float = 5.0
    real_episodes: int = 0         # real-game episodes scored at every checkpoint (0: only at the end)
    final_episodes: int = 20       # real-game episodes scored at the end, agent and random policy
    real_max_steps: int = 10_000   # a real game is cut after this many steps (an agent may never serve)
    seed: int = 0
    device: str = "cpu"


def world_env(cfg: AgentConfig):
    """The imagined worlds as an SB3 VecEnv, and the game they stand for."""
    from stable_baselines3.common.vec_env import VecFrameStack, VecMonitor

    from agents.vec_env import WorldVecEnv
    from envs.world_model_vector_env import WorldModelVectorEnv

    where = {"checkpoint": cfg.world} if cfg.world.endswith(".safetensors") else {"world": cfg.world}
    venv = WorldModelVectorEnv(num_envs=cfg.envs, horizon=cfg.horizon, timing_in_info=False, device=cfg.device,
                               **where)
    game = venv.runtime.game
    vec = VecFrameStack(VecMonitor(WorldVecEnv(venv)), cfg.frame_stack)
    vec.seed(cfg.seed)
    return vec, game, tuple(venv.single_observation_space.shape[:2])


def _save(model, out: Path, state: dict) -> None:
    tmp = out / ("tmp-" + AGENT)
    model.save(tmp)
    tmp.replace(out / AGENT)  # a kill mid-save leaves the previous agent whole
    (out / STATE).write_text(json.dumps(state, indent=1))


def train(cfg: AgentConfig) -> dict:
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from tqdm import tqdm

    from agents.real_game import score

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    vec, game, size = world_env(cfg)
    if not game:
        raise ValueError(f"world {cfg.world} does not name the game it was made from (info['game']): "
                         f"it cannot be scored in the real game")
    state = json.loads((out / STATE).read_text()) if (out / STATE).is_file() else {"seconds": 0.0}
    if (out / AGENT).is_file():
        model = PPO.load(out / AGENT, env=vec, device=cfg.device)
        print(f"agents: resuming {out / AGENT} at {model.num_timesteps:,} steps, "
              f"{state['seconds'] / 60:.1f} of {cfg.minutes:g} min used")
    else:
        model = PPO("CnnPolicy", vec, n_steps=cfg.n_steps, batch_size=cfg.batch_size, n_epochs=cfg.epochs,
                    learning_rate=cfg.lr, ent_coef=cfg.ent_coef, gamma=cfg.gamma, seed=cfg.seed,
                    device=cfg.device, verbose=0)
    (out / "config.json").write_text(json.dumps({**asdict(cfg), "game": game, "frame_size": list(size)}, indent=1))
    budget = cfg.minutes * 60 - state["seconds"]

    def checkpoint(seconds: float) -> None:
        state["seconds"] = seconds
        dream = [e["r"] for e in model.ep_info_buffer] if model.ep_info_buffer else []
        row = {"timesteps": int(model.num_timesteps), "minutes": seconds / 60,
               "dream_return": float(np.mean(dream)) if dream else None}
        if cfg.real_episodes:
            row["real_return"] = score(model, game, size, None, cfg.frame_stack, cfg.real_episodes,
                                       cfg.seed, max_steps=cfg.real_max_steps)["agent"]["mean"]
        with open(out / LOG, "a") as f:
            f.write(json.dumps(row) + "\n")
        _save(model, out, state)
        plot(out)

    start_seconds, t_start = state["seconds"], time.perf_counter()

    def elapsed() -> float:  # training seconds of all runs, this one included
        return start_seconds + time.perf_counter() - t_start

    class Budget(BaseCallback):
        def _on_training_start(self) -> None:
            self.last = time.perf_counter()
            self.bar = tqdm(total=int(budget), unit="s", desc="agent (dream)", dynamic_ncols=True)

        def _on_step(self) -> bool:
            now = time.perf_counter()
            if int(now - t_start) > self.bar.n:  # redraw once a second
                dream = [e["r"] for e in self.model.ep_info_buffer]
                self.bar.n = int(now - t_start)
                self.bar.set_postfix(steps=self.model.num_timesteps, refresh=False,
                                     dream_return=f"{np.mean(dream):.2f}" if dream else "-")
                self.bar.refresh()
            if now - self.last >= cfg.checkpoint_minutes * 60:
                self.last = now
                checkpoint(elapsed())
            return elapsed() < cfg.minutes * 60

    if budget > 0:
        cb = Budget()
        try:
            model.learn(total_timesteps=10**12, callback=cb, reset_num_timesteps=False)
        finally:
            cb.bar.close()
            checkpoint(elapsed())
    vec.close()
    result = {"game": game, "timesteps": int(model.num_timesteps), "train_minutes": state["seconds"] / 60,
              **score(model, game, size, None, cfg.frame_stack, cfg.final_episodes, cfg.seed + 1,
                       max_steps=cfg.real_max_steps)}
    (out / "score.json").write_text(json.dumps(result, indent=1))
    plot(out, result)
    return result


def plot(out: Path, final: dict | None = None) -> None:
    """score.png: the dream's mean return, and the real game's where scored, against training steps."""
    from train.eval.report import line_plot

    rows = [json.loads(line) for line in (out / LOG).read_text().splitlines()] if (out / LOG).is_file() else []
    series = {"dream return": ([r["timesteps"] for r in rows if r.get("dream_return") is not None],
                               [r["dream_return"] for r in rows if r.get("dream_return") is not None])}
    real = [(r["timesteps"], r["real_return"]) for r in rows if r.get("real_return") is not None]
    if real:
        series["real game return"] = ([x for x, _ in real], [y for _, y in real])
    styles = {}
    if final is not None:
        x = [final["timesteps"]]
        series[f"real, final ({len(final['agent']['returns'])} games)"] = (x, [final["agent"]["mean"]])
        series["random policy (real)"] = (x, [final["random"]["mean"]])
        styles["random policy (real)"] = "dashed"
    line_plot(series, out / "score.png", "agent trained in the world", "episode return", log2_x=False,
              styles=styles)


