"""Evaluation: metrics against known values, baselines and Δ-PSNR on hand-made sequences, the
held-out split, and the CLI on a tiny random world and a tiny recorded dataset."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from episodes.writer import EpisodeWriter
from tests.conftest import make_tiny_world
from train.eval import metrics as M
from train.eval import report
from train.eval.reference import Reference
from train.eval.score import drift, drift_contexts, fidelity, other_clips, shuffle_in_time, world_contexts
from train.eval.split import Clips, anchors, held_out_count, split_ids
from train.eval.run import main as evaluate_main
from worldmodel.checkpoint import save_world


pytestmark = pytest.mark.usefixtures("one_thread")

def test_psnr_known_values() -> None:
    a = np.full((2, 8, 8, 3), 100, np.uint8)
    assert np.all(np.isinf(M.psnr(a, a)))
    b = a.copy()
    b[0] += 10                                 # every pixel off by 10: MSE 100
    b[1, :4] += 20                             # half the pixels off by 20: MSE 200
    np.testing.assert_allclose(M.mse(a, b), [100.0, 200.0])
    np.testing.assert_allclose(M.psnr(a, b), [10 * math.log10(255**2 / 100), 10 * math.log10(255**2 / 200)])
    assert M.mean_db([np.inf, 40.0]) == (M.PSNR_CAP + 40) / 2  # identical frames are capped in averages
    # masked: only the changed half of frame 1 counts
    mask = np.zeros((8, 8), bool)
    mask[:4] = True
    assert math.isclose(M.masked_psnr(a[1], b[1], mask), 10 * math.log10(255**2 / 400))
    assert math.isnan(M.masked_psnr(a[1], b[1], np.zeros((8, 8), bool)))


def test_ssim_identity_symmetry_and_noise() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(M.ssim(x, x), 1.0)
    noisy = np.clip(x.astype(int) + rng.normal(0, 30, x.shape), 0, 255).astype(np.uint8)
    s = M.ssim(x, noisy)
    np.testing.assert_allclose(s, M.ssim(noisy, x))
    assert np.all(s < 0.95)
    flat = np.full_like(x, 128)
    assert np.all(M.ssim(x, flat) < s)  # a flat guess loses all structure
    # two flat images: only the luminance term is left, (2ab + C1) / (a^2 + b^2 + C1)
    a, b = np.full((16, 16, 3), 100, np.uint8), np.full((16, 16, 3), 150, np.uint8)
    expected = (2 * 100 * 150 + M.SSIM_C1) / (100**2 + 150**2 + M.SSIM_C1)
    assert math.isclose(M.ssim(a, b), expected, rel_tol=1e-9)


def sprite_sequence(positions: list[int]) -> np.ndarray:
    """A white 2x2 sprite on black at the given x positions: (T, 8, 16, 3)."""
    f = np.zeros((len(positions), 8, 16, 3), np.uint8)
    for t, x in enumerate(positions):
        f[t, 3:5, x:x + 2] = 255
    return f


def reference(mean_frame: np.ndarray) -> Reference:
    return Reference(mean_frame=mean_frame, mean_range=(0, 255), std_range=(0, 255), duplicate_fraction=0.0,
                     probe=None, action_names=[], frames=0, pairs=0, key="", path=Path("."))


def simulate(start: int, actions: np.ndarray) -> list[int]:
    """The toy game: action 1 moves the sprite right, 2 left, 0 stays."""
    xs, x = [], start
    for a in actions:
        x = min(max(x + {0: 0, 1: 1, 2: -1}[int(a)], 0), 14)
        xs.append(x)
    return xs


def toy_clips() -> Clips:
    acts = np.array([[0, 0, 1, 1, 1, 2, 0, 1], [0, 0, 2, 2, 0, 1, 1, 1]])
    frames = np.stack([sprite_sequence([5, 5] + simulate(5, a[2:])) for a in acts])
    return Clips(frames, acts, ["e0", "e1"], [1, 1], context=2, horizon=6)


def test_drift_flags_a_rollout_that_turns_into_one_colour() -> None:
    rng = np.random.default_rng(0)
    textured = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 200  # one saturated colour: high all-pixel std (channels differ), no spatial spread
    assert M.frame_stats(red[None])[1][0] > 90 and M.colour_spread(red[None])[0] == 0
    part_red = textured.copy()
    part_red[10:20] = red  # 25% of the rollout, then back to texture (the last tenth looks fine)
    ref = reference(np.zeros((8, 8, 3), np.uint8))
    assert not drift(textured, ref)["flags"]["uniform"]
    d = drift(part_red, ref)
    assert d["uniform_fraction"] == 0.25 and d["flags"]["uniform"] and not d["flags"]["flat"]
    # a world whose real frames are often uniform (facing walls) is held to its own share
    ref.uniform_fraction = 0.2
    assert not drift(part_red, ref)["flags"]["uniform"]  # 0.25 <= max(2 x 0.2, 0.2 + 0.1)


def test_drift_pools_rollouts_from_several_contexts() -> None:
    rng = np.random.default_rng(1)
    rollouts = rng.integers(0, 256, (4, 40, 8, 8, 3), dtype=np.uint8)
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 200
    rollouts[2, 16:] = red  # one context of four walks into a red wall and stays there (60%)
    ref = reference(np.zeros((8, 8, 3), np.uint8))
    d = drift(rollouts, ref)
    assert d["rollouts"] == 4 and d["frames"] == 40
    assert d["uniform_fraction_per_rollout"] == [0.0, 0.0, 0.6, 0.0]
    assert abs(d["uniform_fraction"] - 0.15) < 1e-9 and d["flags"]["uniform"]
    assert not drift(rollouts[0], ref)["flags"]["uniform"]  # the first context alone misses it
    # a rollout that ends as one grey level is flat even when the others are fine
    rollouts[1, -8:] = 90
    assert drift(rollouts, ref)["flags"]["flat"] and not drift(rollouts[[0, 3]], ref)["flags"]["flat"]
    # frozen pools the second halves (20 pairs each): the red rollout repeats in all 20, the grey one in 7
    assert abs(drift(rollouts, ref)["duplicate_fraction_second_half"] - (20 + 7) / 80) < 1e-9


def test_drift_contexts_spread_over_the_held_out_clips() -> None:
    assert drift_contexts(72, 4).tolist() == [0, 24, 47, 71]
    assert drift_contexts(2, 4).tolist() == [0, 1] and drift_contexts(5, 1).tolist() == [0]


def test_repeat_last_baseline_on_a_hand_made_sequence() -> None:
    clips = toy_clips()
    gen = clips.future_frames.copy()
    fid, _, _ = fidelity(clips, gen, gen, reference(np.zeros((8, 16, 3), np.uint8)), [1, 4])
    # clip 0: at h=1 the sprite moved by one pixel: 2 old + 2 new pixels differ from the last context frame
    real, last = clips.future_frames[:, 0], clips.last_context
    expected = M.mean_db(M.psnr(np.repeat(last[:, None], 1, 1)[:, 0], real))
    assert math.isclose(fid["1"]["repeat_last"]["psnr"], expected)
    mse0 = 4 * 255**2 * 3 / (8 * 16 * 3)
    assert math.isclose(M.psnr(last[0], real[0]), 10 * math.log10(255**2 / mse0))
    assert fid["1"]["repeat_last"]["psnr_dynamic"] == 0.0       # wrong on every changed pixel
    assert fid["1"]["psnr"] == M.PSNR_CAP                       # a perfect model, capped
    # the mean-frame baseline (black) misses exactly the 4 sprite pixels
    assert math.isclose(fid["4"]["mean_frame"]["psnr"], 10 * math.log10(255**2 / mse0))


def test_delta_psnr_is_positive_for_an_oracle_and_zero_for_an_action_blind_model() -> None:
    clips = toy_clips()
    fut = clips.future_actions
    shuffled = shuffle_in_time(fut, seed=3)
    assert not np.array_equal(shuffled, fut) and np.array_equal(np.sort(shuffled), np.sort(fut))
    oracle = lambda acts: np.stack([sprite_sequence(simulate(5, a)) for a in acts])  # noqa: E731
    ref = reference(np.zeros((8, 16, 3), np.uint8))
    other = other_clips(fut, seed=3)
    assert sorted(map(tuple, other)) == sorted(map(tuple, fut))  # rows moved, not made up
    assert all(not np.array_equal(o, f) for o, f in zip(other, fut))
    _, delta, delta_other = fidelity(clips, oracle(fut), oracle(shuffled), ref, [1, 3, 6], other=oracle(other))
    assert delta["1"] > 10 and delta["3"] > 10, delta
    assert delta["6"] == 0  # a permutation of moves ends where the recording does: Δ-PSNR can be 0
    assert delta_other["6"] > 10, delta_other  # another clip's moves do not: the end state differs
    blind = np.repeat(clips.last_context[:, None], 6, axis=1)  # ignores actions: same frames either way
    _, delta, delta_other = fidelity(clips, blind, blind, ref, [2, 6], other=blind)
    assert all(d == 0 for d in delta.values()) and all(d == 0 for d in delta_other.values())


def test_table_has_the_tokenizer_ceiling_row() -> None:
    """The ceiling row repeats the tokenizer's reconstruction scores beside the same baselines, so a
    reader sees when repeat-last is out of any decoded model's reach (here at h=1: 48 > 47)."""
    def fid(psnr, tok, repeat):
        return {"psnr": psnr, "ssim": 0.9, "psnr_dynamic": psnr - 10,
                "repeat_last": {"psnr": repeat, "psnr_dynamic": 13.0},
                "mean_frame": {"psnr": 32.0, "psnr_dynamic": 17.0},
                "tokenizer": {"psnr": tok, "psnr_dynamic": 68.0}}
    m = {"protocol": "engine", "sampler": "few_step", "steps": 2,
         "fidelity": {"1": fid(44.0, 47.0, 48.0), "4": fid(42.0, 46.5, 42.0)},
         "controllability": {"delta_psnr": {"1": 2.0, "4": 5.0}, "probe": {}},
         "drift": {"flags": {"frozen": False}}, "speed": {"first_frame_ms": 30.0, "frame_ms": 15.0}}
    table = report.markdown_table([report.table_row("dmd-2", m)], [1, 4])
    lines = [line for line in table.splitlines() if line.startswith("| tokenizer ceiling (dmd-2) |")]
    assert len(lines) == 1
    cells = [c.strip() for c in lines[0].strip("|").split("|")]
    assert cells[2:6] == ["47.0 (48.0 / 32.0)", "46.5 (42.0 / 32.0)", "68.0 (13.0)", "68.0 (13.0)"]
    assert len(cells) == len(table.splitlines()[0].strip("|").split("|"))
    # a row without tokenizer scores (e.g. an older metrics.json) adds no ceiling row
    for f in m["fidelity"].values():
        del f["tokenizer"]
    table = report.markdown_table([report.table_row("dmd-2", m)], [1, 4])
    assert not any(line.startswith("| tokenizer ceiling") for line in table.splitlines())


def test_held_out_split_and_anchors() -> None:
    assert [held_out_count(n) for n in (1, 2, 9, 10, 11, 25)] == [1, 1, 1, 1, 2, 3]
    train, held = split_ids([f"ep-{i:02d}" for i in (3, 1, 0, 2, 10, 4, 5, 6, 7, 8, 9)])
    assert held == ["ep-09", "ep-10"] and train[0] == "ep-00" and len(train) == 9
    assert anchors(30, 4, 10, 3) == [3, 11, 19]
    assert anchors(13, 4, 10, 3) == []


def write_dataset(root: Path, episodes: int = 5, length: int = 40, size: int = 32,
                  action_names: tuple[str, ...] = ("noop", "left", "right", "fire")) -> None:
    """A paddle the actions steer and a ball that bounces on its own (so frames always change);
    FIRE gives a reward, the last frame ends the episode."""
    for e in range(episodes):
        rng = np.random.default_rng(e)
        with EpisodeWriter(root, {"game": "toy", "action_names": list(action_names)},
                           (size, size, 3)) as w:
            x = 10
            for t in range(length):
                a = -1 if t == 0 else int(rng.integers(0, 4))
                x = min(max(x + 2 * (a == 2) - 2 * (a == 1), 0), size - 4)
                frame = np.zeros((size, size, 3), np.uint8)
                frame[size - 6:size - 3, x:x + 4] = (200, 80, 80)
                frame[2:4, :] = (60, 160, 60)
                by, bx = 6 + abs((t + 3 * e) % 30 - 15), abs((2 * t + e) % 56 - 28)
                frame[by:by + 2, bx:bx + 2] = 255
                w.add(frame, a, reward=float(a == 3), terminated=t == length - 1)


def carried_context() -> tuple[torch.Tensor, torch.Tensor]:
    """Real context as a world carries it: clips of 9, 9 and 4 frames, -1 on each clip's first."""
    g = torch.Generator().manual_seed(3)
    frames = torch.randint(0, 256, (22, 32, 32, 3), generator=g, dtype=torch.uint8)
    actions = torch.randint(0, 4, (22,), generator=g)
    actions[[0, 9, 18]] = -1
    return frames, actions


def test_world_contexts_are_the_newest_frames_of_each_long_enough_clip() -> None:
    world = make_tiny_world(num_actions=4)
    world.context_frames, world.context_actions = carried_context()
    frames, actions = world_contexts(world, 7)
    assert frames.shape == (2, 7, 32, 32, 3)  # the 4-frame clip is too short for a 7-frame context
    assert np.array_equal(frames[1], world.context_frames[11:18].numpy())
    assert np.array_equal(actions[0], world.context_actions[2:9].numpy())
    assert world_contexts(world, 10) is None
    world.context_frames = None
    assert world_contexts(world, 7) is None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    write_dataset(root / "data")
    world = make_tiny_world(num_actions=4)
    world.context_frames, world.context_actions = carried_context()
    save_world(root / "world.safetensors", world)
    teacher = make_tiny_world(num_actions=4, seed=1)
    teacher.info["stage"] = "teacher"
    teacher.engine = {"sampler": "euler", "steps": 2, "first_frame_steps": 2, "dtype": "float32", "seed": 0}
    save_world(root / "teacher.safetensors", teacher)
    return root


FAST = ["horizons=1,4", "rollout=12", "probe_steps=10", "starts=2", "videos=1"]


def test_evaluate_cli_writes_metrics_plots_and_videos(tiny: Path, capsys) -> None:
    out = tiny / "out"
    assert evaluate_main([f"checkpoint={tiny / 'world.safetensors'}", f"data={tiny / 'data'}", f"out={out}",
                          *FAST]) == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in ("fidelity", "controllability", "drift", "speed", "rewards", "split"):
        assert key in m
    f1 = m["fidelity"]["1"]
    for key in ("psnr", "ssim", "psnr_dynamic", "repeat_last", "mean_frame", "tokenizer", "psnr_shuffled"):
        assert key in f1
    assert set(m["controllability"]["delta_psnr"]) == set(m["controllability"]["delta_psnr_other"]) == {"1", "4"}
    probe = m["controllability"]["probe"]
    assert 0 <= probe["real_accuracy"] <= 1 and 0 <= probe["generated_accuracy"] <= 1
    assert set(m["drift"]["flags"]) == {"out_of_range", "frozen", "flat", "uniform"} and m["drift"]["frames"] == 12
    # drift_contexts defaults to 4: the two held-out clips give two rollouts, the world's two long
    # enough carried clips two more, pooled
    assert m["drift"]["rollouts"] == 4
    assert m["drift"]["contexts"] == ["held_out:0", "held_out:1", "world:0", "world:1"]
    assert len(m["drift"]["uniform_fraction_per_rollout"]) == 4
    assert m["speed"]["first_frame_ms"] > 0 and m["speed"]["frame_ms"] > 0
    assert m["rewards"]["transitions"] > 0 and m["split"]["held_out"] and m["protocol"] == "engine"
    assert m["context_frames"] == 7 and m["samples"] == 2
    for name in ("psnr_vs_horizon.png", "psnr_dynamic_vs_horizon.png", "table.md", "table.json",
                 "samples/sample_0.mp4", "samples/drift.mp4"):
        assert (out / name).stat().st_size > 0, name
    # the probe is cached next to the dataset, keyed by its content
    assert len(list((tiny / "data" / ".eval_cache").glob("reference-*.safetensors"))) == 1


def test_evaluate_several_checkpoints_one_table(tiny: Path) -> None:
    out = tiny / "several"
    assert evaluate_main([f"checkpoints=[{tiny / 'world.safetensors'},{tiny / 'teacher.safetensors'}]",
                          "names=[student,teacher]", f"data={tiny / 'data'}", f"out={out}", *FAST]) == 0
    rows = json.loads((out / "table.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["student", "teacher"]
    assert json.loads((out / "teacher" / "metrics.json").read_text())["protocol"] == "joint"
    table = (out / "table.md").read_text()
    assert "| student |" in table and "| teacher |" in table and "PSNR@4 (repeat / mean)" in table


def test_single_episode_dataset_is_scored_with_a_warning(tiny: Path, capsys) -> None:
    write_dataset(tiny / "one", episodes=1)
    out = tiny / "one_out"
    assert evaluate_main([f"checkpoint={tiny / 'world.safetensors'}", f"data={tiny / 'one'}", f"out={out}",
                          *FAST]) == 0
    assert "nothing is held out" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["split"]["held_out_is_training"] is True


@pytest.mark.parametrize("args, message", [
    (["checkpoint=no/such/world.safetensors", "data={data}"], "does not exist"),
    (["checkpoint={world}", "data=no/such/dir"], "dataset directory no/such/dir does not exist"),
    (["checkpoint={world}", "data={data}", "horizons=64"], "no held-out episode is long enough"),
    (["checkpoint={world}", "data={data}", "steps=3"], "few_step sampler runs"),
    (["checkpoint={world}", "data={data}", "bogus=1"], "unknown option"),
    (["checkpoint={world}", "data={data}", "drift_world=maybe"], "bad value for drift_world"),
    (["data={data}"], "no checkpoint given"),
])
def test_bad_input_one_line_no_traceback(tiny: Path, args: list[str], message: str, capsys) -> None:
    argv = [a.format(data=tiny / "data", world=tiny / "world.safetensors") for a in args]
    assert evaluate_main([*argv, f"out={tiny / 'bad'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize("module", ["train.eval", "train.evaluate"])  # the old spelling still works
def test_cli_entry_point_exit_code(tiny: Path, module: str) -> None:
    r = subprocess.run([sys.executable, "-m", module, f"checkpoint={tiny / 'nope.safetensors'}",
                        f"data={tiny / 'data'}"], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2 and "Traceback" not in r.stderr and "does not exist" in r.stderr
    assert ("is now `python -m train.eval`" in r.stderr) == (module == "train.evaluate")


def test_a_first_person_world_gets_the_play_check_in_metrics_and_table(tmp_path: Path) -> None:
    """Action names with forward and both turns: the evaluation plays player-like plans from the
    held-out contexts and the world's reset clips, and reports the play check beside the rest."""
    names = ["NOOP", "FORWARD", "TURN_LEFT", "TURN_RIGHT"]
    write_dataset(tmp_path / "data", action_names=tuple(names))
    world = make_tiny_world(num_actions=4)
    world.action_names = names
    world.context_frames, world.context_actions = carried_context()
    save_world(tmp_path / "world.safetensors", world)
    out = tmp_path / "out"
    assert evaluate_main([f"checkpoint={tmp_path / 'world.safetensors'}", f"data={tmp_path / 'data'}",
                          f"out={out}", *FAST, "play_rollout=40", "game_rollout=0"]) == 0
    play = json.loads((out / "metrics.json").read_text())["play"]
    assert play["rollout_frames"] == 40 and play["contexts"] == 2 + 2  # held-out + carried clips
    assert set(play["passes"]) == {"near_uniform", "one_colour", "sharpness", "turn_back"}
    assert 0 <= play["world"]["near_uniform_share"] <= 1 and play["real"]["frames"] > 0
    assert len(play["per_context"]) == 4 and "### Play" in (out / "table.md").read_text()
    assert (out / "samples" / "play_0.mp4").stat().st_size > 0
