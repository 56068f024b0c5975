"""End to end on a real game: record 600 MiniGrid frames (2+ episodes: one is held out) -> `stage=all` (every stage, causal ODE included)
-> evaluate -> the world plays in the env. Tiny sizes, a few steps per stage."""

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from record.__main__ import main as record_main
from train.app import main as train_main
from train.evaluate import main as evaluate_main


@pytest.mark.slow
def test_record_train_all_evaluate_play(tmp_path: Path) -> None:
    data, runs = tmp_path / "data", tmp_path / "runs"
    assert record_main(["collect", "--env", "minigrid", "--controller", "random", "--frames", "600",
                        "--out", str(data), "--seed", "0", "--no-progress"]) == 0
    assert train_main(["stage=all", f"data={data}", "model=tiny", f"runs_root={runs}", "steps=2",
                       "progress=false", "data.batch_size=4", "stage.causal_ode=true"]) == 0
    world = runs / "world.safetensors"
    timings = json.loads((runs / "pipeline_timings.json").read_text())
    assert set(timings) == {"tokenizer", "teacher", "ar", "causal_cd", "causal_ode", "dmd", "rewards"}
    out = tmp_path / "eval"
    assert evaluate_main([f"checkpoint={world}", f"data={data}", f"out={out}", "horizons=1,4",
                          "rollout=12", "probe_steps=10", "starts=2", "videos=1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"fidelity", "controllability", "drift", "speed"} <= set(metrics)
    env = gym.make("WorldModel-v0", checkpoint=str(world), horizon=5)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
    for _ in range(5):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert truncated or terminated
