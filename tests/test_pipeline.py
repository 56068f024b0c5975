"""End to end on a real game: record 600 MiniGrid frames (2+ episodes: one is held out) -> `stage=all` (every stage, causal ODE included)
-> evaluate -> the world plays in the env. Tiny sizes, a few steps per stage."""

import json
from pathlib import Path

import gymnasium as gym
import torch
from safetensors import safe_open
import numpy as np
import pytest

from record.__main__ import main as record_main
from episodes.reader import Dataset
from train.app import main as train_main
from train.assemble import CONTEXT_CLIP_LEN
from train.assemble import main as assemble_main
from train.eval.split import split_dirs
from train.eval.run import main as evaluate_main
from worldmodel.checkpoint import load_world


@pytest.mark.slow
def test_record_train_all_evaluate_play(tmp_path: Path) -> None:
    data, runs = tmp_path / "data", tmp_path / "runs"
    assert record_main(["collect", "--env", "minigrid", "--controller", "random", "--frames", "600",
                        "--out", str(data), "--seed", "0", "--no-progress"]) == 0
    assert train_main(["stage=all", f"data={data}", "model=tiny", f"runs_root={runs}", "max_steps=2",
                       "progress=false", "data.batch_size=4", "stage.causal_ode=true"]) == 0
    world = runs / "world.safetensors"
    timings = json.loads((runs / "pipeline_timings.json").read_text())
    assert set(timings) == {"tokenizer", "teacher", "ar", "causal_cd", "causal_ode", "dmd", "rewards"}
    check_shippable(world, data)
    # The DMD variants with ar scores run from the same exports; a wrong score export exits 2.
    for variant in ("ar", "teacher_ar_guidance"):
        dmd = ["stage=dmd", f"data={data}", "model=tiny", f"runs_root={runs}", "max_steps=5", "progress=false",
               "data.batch_size=4", f"stage.real_score={variant}", f"run_dir={tmp_path / variant}"]
        assert train_main(dmd) == 0  # 5 steps: a generator update and critic updates
        assert (tmp_path / variant / "export" / "world.safetensors").exists()
        assert train_main([*dmd, f"stage.ar={runs / 'teacher' / 'export'}"]) == 2
    # A context teacher and the DMD whose scores see the context clean; the plain teacher is refused.
    common = [f"data={data}", "model=tiny", f"runs_root={runs}", "progress=false", "data.batch_size=4"]
    assert train_main(["stage=teacher", *common, "max_steps=2", "stage.context_frames=2",
                       f"run_dir={tmp_path / 'teacher_ctx'}"]) == 0
    export = tmp_path / "teacher_ctx" / "export"
    assert json.loads((export / "dit.json").read_text())["context_frames"] == 2
    assert load_world(export / "world.safetensors").info["context_frames"] == 2
    dmd = ["stage=dmd", *common, "max_steps=5", "stage.clean_context=true", f"run_dir={tmp_path / 'clean'}"]
    assert train_main([*dmd, f"stage.teacher={export}"]) == 0
    assert train_main(dmd) == 2
    assert train_main(["stage=teacher", *common, "stage.context_frames=8", f"run_dir={tmp_path / 'bad'}"]) == 2
    # The standalone assembler makes the same world from the stage exports; bad input exits 2.
    again = tmp_path / "again.safetensors"
    assert assemble_main(["--runs-root", str(runs), "--data", str(data), "--out", str(again)]) == 0
    assert torch.equal(load_world(again).context_frames, load_world(world).context_frames)
    assert assemble_main(["--runs-root", str(tmp_path / "nowhere"), "--data", str(data)]) == 2
    out = tmp_path / "eval"
    assert evaluate_main([f"checkpoint={world}", f"data={data}", f"out={out}", "horizons=1,4",
                          "rollout=12", "probe_steps=10", "starts=2", "videos=1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"fidelity", "controllability", "drift", "speed"} <= set(metrics)
    # the shipped file sits outside any stage export: its DMD stage's cost came along inside it
    wallclock = json.loads((runs / "dmd_2step_b1" / "export" / "wallclock.json").read_text())
    assert metrics["training"] == wallclock and wallclock["steps"] == 2
    env = gym.make("WorldModel-v0", checkpoint=str(world), horizon=5)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
    for _ in range(5):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert truncated or terminated


def check_shippable(world_path: Path, data: Path) -> None:
    """bf16 weights, reward heads, and context frames that are real training frames, clip starts
    marked with the null action."""
    with safe_open(str(world_path), framework="pt") as f:
        assert f.get_tensor(next(k for k in f.keys() if k.startswith("dit."))).dtype == torch.bfloat16
    w = load_world(world_path)
    assert w.reward is not None and w.info["game"] == "minigrid"
    frames, actions = w.context_frames.numpy(), w.context_actions.numpy()
    starts = np.flatnonzero(actions < 0)
    assert len(frames) % CONTEXT_CLIP_LEN == 0 and list(starts) == list(range(0, len(frames), CONTEXT_CLIP_LEN))
    dataset = Dataset(data)
    train_dirs, _ = split_dirs(dataset)
    real = np.concatenate([ep.frames for d in train_dirs for ep in dataset.read(d)])
    for clip in np.split(frames, len(starts)):
        hits = np.flatnonzero((real == clip[0]).all(axis=(1, 2, 3)))
        assert any((real[i:i + len(clip)] == clip).all() for i in hits if i + len(clip) <= len(real))
