"""``python -m record``: collect, stats and view, and one clear line for every kind of bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pygame
import pytest

from record.__main__ import main
from episodes.reader import Dataset
from record.viewer import view
from episodes.writer import EpisodeWriter

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_collect_then_stats(tmp_path: Path, capsys) -> None:
    code, out, _ = run(
        capsys,
        "collect",
        "--env",
        "minigrid",
        "--frames",
        "40",
        "--out",
        str(tmp_path),
        "--seed",
        "1",
        "--no-progress",
    )
    assert code == 0 and json.loads(out)["frames"] == 40
    code, out, _ = run(capsys, "stats", str(tmp_path), "--json")
    stats = json.loads(out)
    assert code == 0 and stats["frames"] == 40 and stats["bad_chunks"] == []
    for key in ("episodes", "actions", "rewards", "terminated", "truncated", "controllers", "ends"):
        assert key in stats
    assert set(stats["actions"]) <= {"left", "right", "forward", "pickup", "drop", "toggle", "done"}
    code, out, _ = run(capsys, "stats", str(tmp_path))
    assert code == 0 and "40 frames" in out


def test_rerunning_appends_and_resume_counts_what_is_there(tmp_path: Path, capsys) -> None:
    args = [
        "collect",
        "--env",
        "minigrid",
        "--out",
        str(tmp_path),
        "--no-progress",
        "--episodes",
        "2",
        "--max-episode-frames",
        "10",
    ]
    assert run(capsys, *args)[0] == 0
    first = {p: p.read_bytes() for p in tmp_path.glob("*/*")}
    assert run(capsys, *args)[0] == 0
    assert len(Dataset(tmp_path).episode_dirs) == 4
    assert all(p.read_bytes() == data for p, data in first.items())  # nothing clobbered
    seeds = [Dataset(tmp_path).meta(d)["episode_index"] for d in Dataset(tmp_path).episode_dirs]
    assert seeds == [0, 1, 2, 3]  # appended episodes continue the seed sequence
    code, out, _ = run(
        capsys,
        "collect",
        "--env",
        "minigrid",
        "--out",
        str(tmp_path),
        "--no-progress",
        "--frames",
        "40",
        "--resume",
    )
    assert code == 0 and json.loads(out)["frames"] == 0  # 40 frames are already there


def test_collect_at_a_chosen_size_with_two_workers(tmp_path: Path, capsys) -> None:
    code, out, _ = run(
        capsys,
        "collect",
        "--env",
        "breakout",
        "--frames",
        "60",
        "--workers",
        "2",
        "--size",
        "32x32",
        "--out",
        str(tmp_path),
        "--no-progress",
    )
    assert code == 0 and json.loads(out)["frames"] == 60
    episodes = list(Dataset(tmp_path).episodes())
    assert len(episodes) == 2 and all(e.frames.shape[1:] == (32, 32, 3) for e in episodes)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["collect", "--env", "nosuchgame", "--frames", "5", "--out", "{tmp}"], "unknown game 'nosuchgame'"),
        (
            ["collect", "--env", "breakout", "--controller", "explorer", "--frames", "5", "--out", "{tmp}"],
            "first-person",
        ),
        (["collect", "--env", "breakout", "--out", "{tmp}"], "needs a budget"),
        (["collect", "--frames", "5", "--out", "{tmp}"], "which game"),
        (["stats", "{tmp}/missing"], "does not exist"),
        (["stats", "{tmp}/afile"], "is a file, not a dataset directory"),
        # an --out inside a file cannot be made: one line before any worker starts
        (["collect", "--env", "breakout", "--frames", "5", "--workers", "2", "--out", "{tmp}/afile/x"],
         "cannot write the dataset to --out"),
        (["stats", "{tmp}"], "no episodes"),
        (["view", "{tmp}"], "no episodes"),
    ],
)
def test_bad_input_gets_one_clear_line(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    (tmp_path / "afile").write_text("not a dataset")
    code, _, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_one_dataset_directory_per_game(tmp_path: Path, capsys) -> None:
    assert (
        run(capsys, "collect", "--env", "minigrid", "--frames", "5", "--out", str(tmp_path), "--no-progress")[
            0
        ]
        == 0
    )
    code, _, err = run(capsys, "collect", "--env", "breakout", "--frames", "5", "--out", str(tmp_path))
    assert code == 2 and "one --out directory per game" in err


def test_bad_arguments_are_argparse_errors(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["collect", "--env", "breakout", "--size", "big", "--out", "x"])
    assert exit_.value.code == 2 and "HxW" in capsys.readouterr().err


def test_stats_when_nothing_is_readable(tmp_path: Path, capsys) -> None:
    writer = EpisodeWriter(tmp_path, {"game": "toy"}, (8, 8, 3))
    writer.add(np.zeros((8, 8, 3), np.uint8), -1)
    writer.close()
    (chunk,) = tmp_path.glob("*/chunk_*.npz")
    chunk.write_bytes(b"garbage")
    code, out, err = run(capsys, "stats", str(tmp_path), "--json")
    assert code == 1 and json.loads(out)["bad_chunks"] == [str(chunk)] and "nothing" in err


def test_no_traceback_from_the_command_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "record", "stats", str(tmp_path / "nope")],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr and "does not exist" in result.stderr
    help_ = subprocess.run(
        [sys.executable, "-m", "record", "collect", "--help"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert help_.returncode == 0 and "--controller" in help_.stdout and "--resume" in help_.stdout


def test_viewer_steps_through_episodes_headless(tmp_path: Path, capsys) -> None:
    assert (
        run(
            capsys,
            "collect",
            "--env",
            "minigrid",
            "--episodes",
            "2",
            "--max-episode-frames",
            "6",
            "--out",
            str(tmp_path),
            "--no-progress",
        )[0]
        == 0
    )
    pygame.display.init()
    for key in (pygame.K_RIGHT, pygame.K_RIGHT, pygame.K_RIGHT, pygame.K_LEFT):
        pygame.event.post(pygame.event.Event(pygame.KEYDOWN, key=key, mod=0))
    state = view(tmp_path, max_steps=2)
    assert (state.episode, state.frame) == (0, 2)
    pygame.display.init()
    for key in (pygame.K_DOWN, pygame.K_END, pygame.K_ESCAPE):
        pygame.event.post(pygame.event.Event(pygame.KEYDOWN, key=key, mod=0))
    state = view(tmp_path)
    assert (state.episode, state.frame) == (1, 5)
    assert run(capsys, "view", str(tmp_path), "--max-steps", "3")[0] == 0


def test_a_failing_worker_is_one_line(monkeypatch) -> None:
    from record.workers import run_workers
    from record.workers import Stop
    with pytest.raises(RuntimeError) as err:
        run_workers(_failing_session, None, 4, None, 2, 0, 0, Stop(), lambda a, b: None)
    message = str(err.value)
    assert message.startswith("a recording worker failed: OSError: disk full") and "Traceback" not in message
    monkeypatch.setenv("RECORD_DEBUG", "1")
    with pytest.raises(RuntimeError, match="Traceback"):
        run_workers(_failing_session, None, 4, None, 2, 0, 0, Stop(), lambda a, b: None)


def _failing_session(*args):
    raise OSError("disk full")
