"""Agents in a world: the SB3 vector adapter, a resumable time-boxed run, scoring in the real game."""

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("stable_baselines3")

from agents.__main__ import main as agents_main  # noqa: E402
from agents.vec_env import WorldVecEnv  # noqa: E402
from conftest import make_tiny_world  # noqa: E402
from envs.world_model_vector_env import WorldModelVectorEnv  # noqa: E402
from worldmodel.checkpoint import save_world  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    w = make_tiny_world(num_actions=4, image_size=64, context=12)
    w.action_names = ["NOOP", "FIRE", "RIGHT", "LEFT"]
    w.info["game"] = "breakout"
    path = tmp_path_factory.mktemp("agents") / "world.safetensors"
    save_world(path, w)
    return path


def test_adapter_resets_ended_worlds_in_the_same_step(world: Path) -> None:
    venv = WorldModelVectorEnv(num_envs=3, checkpoint=world, horizon=3, timing_in_info=False)
    vec = WorldVecEnv(venv)
    vec.seed(0)
    obs = vec.reset()
    assert obs.shape == (3, 64, 64, 3)
    for t in range(3):
        obs, rewards, dones, infos = vec.step(np.array([0, 1, 2]))
    assert dones.all() and all(i["TimeLimit.truncated"] for i in infos)  # the horizon ended every world
    # SB3 semantics: the step that ends a world returns its new episode's first frame, the last
    # frame goes in the info; the next step is an ordinary step of the new episode
    assert all("terminal_observation" in i for i in infos)
    assert np.array_equal(obs, venv.runtime.frames) and not np.array_equal(obs[0], infos[0]["terminal_observation"])
    assert (venv.elapsed == 0).all()
    _, _, dones, _ = vec.step(np.array([0, 0, 0]))
    assert not dones.any() and (venv.elapsed == 1).all()


def test_train_resume_and_score(world: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "agent"
    args = ["train", "--world", str(world), "--out", str(out), "--minutes", "0.05", "--envs", "2",
            "--n-steps", "8", "--batch-size", "8", "--epochs", "1", "--final-episodes", "1",
            "--real-max-steps", "50", "--checkpoint-minutes", "0.02"]
    assert agents_main(args) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    first = json.loads((out / "state.json").read_text())
    assert log[-1]["timesteps"] >= 16 and first["seconds"] >= 3
    assert (out / "score.png").stat().st_size > 0 and "random" in capsys.readouterr().out
    # the same command again: the budget is spent, so it only scores, from the saved agent
    assert agents_main(args) == 0
    again = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert again[-1]["timesteps"] == log[-1]["timesteps"]
    # a larger budget goes on from the saved step count
    assert agents_main([*args[:5], "--minutes", "0.1", *args[7:]]) == 0
    more = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert more[-1]["timesteps"] > log[-1]["timesteps"]
    s = json.loads((out / "score.json").read_text())
    assert len(s["agent"]["returns"]) == 1 and len(s["random"]["returns"]) == 1
    assert agents_main(["score", "--out", str(out), "--episodes", "2"]) == 0
    assert len(json.loads((out / "score.json").read_text())["agent"]["returns"]) == 2


def test_bad_input(tmp_path: Path, capsys) -> None:
    assert agents_main(["score", "--out", str(tmp_path / "none")]) == 2
    assert "holds no trained agent" in capsys.readouterr().err
    assert agents_main(["train", "--out", str(tmp_path / "a"), "--envs", "0"]) == 2
    assert "--envs must be >= 1" in capsys.readouterr().err
