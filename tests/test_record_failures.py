"""Failure behaviour: kill -9 loses at most the chunk in flight; SIGINT closes cleanly, exit 0."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from envs.registry import make_game
from episodes.reader import Dataset
from record.stats import compute_stats
from episodes.writer import NULL_ACTION, EpisodeWriter

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "SDL_VIDEODRIVER": "dummy", "SDL_AUDIODRIVER": "dummy"}


def start(out: Path, *args: str) -> subprocess.Popen:
    """``python -m record collect`` on MiniGrid into ``out``, in its own process group."""
    cmd = [
        sys.executable,
        "-m",
        "record",
        "collect",
        "--env",
        "minigrid",
        "--out",
        str(out),
        "--seed",
        "0",
        "--chunk-frames",
        "16",
        "--no-progress",
        *args,
    ]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def chunks(out: Path) -> list[Path]:
    return sorted(out.glob("*/chunk_*.npz"))


def test_a_crash_loses_only_the_unflushed_chunk(tmp_path: Path) -> None:
    frames = np.random.default_rng(0).integers(0, 256, (37, 8, 8, 3), dtype=np.uint8)
    writer = EpisodeWriter(tmp_path, {"game": "toy"}, (8, 8, 3), chunk_frames=8)
    for i, frame in enumerate(frames):
        writer.add(frame, NULL_ACTION if i == 0 else 0)
    del writer  # the process dies here: no close(), no flush
    (episode,) = Dataset(tmp_path).episodes()
    assert len(episode) == 32 and np.array_equal(episode.frames, frames[:32])  # 5 < 8 frames lost


def test_kill_9_mid_episode_keeps_every_landed_chunk(tmp_path: Path) -> None:
    proc = start(tmp_path, "--frames", "1000000")
    wait_for(lambda: len(chunks(tmp_path)) >= 5, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    landed = chunks(tmp_path)
    stats = compute_stats(tmp_path)
    assert stats["bad_chunks"] == [] and len(stats["lost_in_flight"]) <= 1
    assert stats["frames"] == sum(len(np.load(c)["actions"]) for c in landed)  # all of them count
    assert stats["open_episodes"] == 1
    # The killed episode is a clean prefix: replaying its actions gives exactly its frames.
    dataset = Dataset(tmp_path)
    open_dir = next(d for d in dataset.episode_dirs if not dataset.meta(d)["closed"])
    (episode,) = dataset.read(open_dir)
    env = make_game("minigrid")
    frame, _ = env.reset(seed=episode.meta["seed"])
    assert np.array_equal(frame, episode.frames[0])
    for i in range(1, len(episode)):
        assert np.array_equal(env.step(int(episode.actions[i]))[0], episode.frames[i])


def check_closed_cleanly(out: Path, proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    dataset = Dataset(out)
    metas = [dataset.meta(d) for d in dataset.episode_dirs]
    assert metas and all(m["closed"] for m in metas)
    assert "interrupted" in {m["end"] for m in metas}
    stats = compute_stats(out)
    assert stats["frames"] == summary["frames"] and stats["lost_in_flight"] == []  # nothing lost
    assert summary["interrupted"] and "Traceback" not in stderr
    return summary


def test_sigint_flushes_and_closes_the_episode(tmp_path: Path) -> None:
    proc = start(tmp_path, "--frames", "1000000")
    wait_for(lambda: len(chunks(tmp_path)) >= 3, proc)
    proc.send_signal(signal.SIGINT)
    check_closed_cleanly(tmp_path, proc)
    last = [e for e in Dataset(tmp_path).episodes()][-1]
    assert last.truncated[-1]  # recording, not the game, ended it


def test_ctrl_c_stops_every_worker(tmp_path: Path) -> None:
    proc = start(tmp_path, "--frames", "1000000", "--workers", "2")
    wait_for(lambda: len({c.parent for c in chunks(tmp_path)}) >= 2, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group
    summary = check_closed_cleanly(tmp_path, proc)
    assert summary["episodes"] >= 2


def test_sigint_in_a_human_session(tmp_path: Path) -> None:
    proc = start(tmp_path, "--controller", "human")
    wait_for(lambda: any(tmp_path.glob("*/meta.json")), proc)
    time.sleep(0.5)  # a few frames at 10 fps
    proc.send_signal(signal.SIGINT)
    check_closed_cleanly(tmp_path, proc)
    (episode,) = Dataset(tmp_path).episodes()
    assert len(episode) >= 2 and set(episode.controller) == {"human"}
