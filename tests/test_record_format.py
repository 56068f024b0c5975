"""The dataset format: chunked atomic writes, lossless reads, damaged chunks named and skipped."""

import json
from pathlib import Path

import numpy as np
import pytest

from episodes.codecs import CODECS
from episodes.reader import Dataset, DatasetError, iter_episodes
from record.stats import compute_stats
from episodes.writer import END_BUDGET, NULL_ACTION, EpisodeWriter

META = {"game": "toy", "fps": 10.0, "action_names": ["noop", "left", "right"]}


def frames_for(n: int, shape=(24, 32, 3), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def write_episode(
    root: Path, frames: np.ndarray, chunk_frames: int = 4, end: str = "terminated", **kw
) -> Path:
    writer = EpisodeWriter(root, META, frames.shape[1:], chunk_frames=chunk_frames, **kw)
    for i, frame in enumerate(frames):
        writer.add(
            frame,
            NULL_ACTION if i == 0 else i % 3,
            reward=float(i),
            controller="random",
            terminated=(end == "terminated" and i == len(frames) - 1),
        )
    writer.close(end)
    return writer.dir


def test_round_trip_is_lossless_and_aligned(tmp_path: Path) -> None:
    frames = frames_for(10)
    ep = write_episode(tmp_path, frames)
    assert sorted(p.name for p in ep.iterdir()) == [
        "chunk_000000.npz",
        "chunk_000001.npz",
        "chunk_000002.npz",
        "meta.json",
    ]
    meta = json.loads((ep / "meta.json").read_text())
    assert (
        meta["closed"]
        and meta["frames"] == 10
        and meta["chunks"] == 3
        and meta["action_names"] == META["action_names"]
    )
    (episode,) = Dataset(tmp_path).episodes()
    assert np.array_equal(episode.frames, frames)
    assert episode.actions.tolist() == [-1] + [i % 3 for i in range(1, 10)]
    assert episode.rewards.dtype == np.float32 and episode.rewards[3] == 3.0
    assert episode.terminated.tolist() == [False] * 9 + [True] and not episode.truncated.any()
    assert set(episode.controller) == {"random"} and np.all(np.diff(episode.timestamps) >= 0)


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_codecs(tmp_path: Path, codec: str) -> None:
    frames = np.repeat(np.linspace(0, 255, 32, dtype=np.uint8)[None, None, :, None], 24, axis=1)
    frames = np.repeat(np.repeat(frames, 3, axis=0), 3, axis=3)  # smooth gradients: jpeg stays close
    write_episode(tmp_path, frames, codec=codec)
    (episode,) = Dataset(tmp_path).episodes()
    error = np.abs(episode.frames.astype(int) - frames).max()
    assert error == 0 if CODECS[codec].lossless else error < 12


def test_stored_size_option_and_model_resolution_iterator(tmp_path: Path) -> None:
    write_episode(tmp_path / "small", frames_for(6), size=(16, 16))
    (episode,) = Dataset(tmp_path / "small").episodes()
    assert episode.frames.shape == (6, 16, 16, 3)
    assert json.loads((episode.path / "meta.json").read_text())["frame_shape"] == [16, 16, 3]
    write_episode(tmp_path / "native", frames_for(6))
    (episode,) = iter_episodes(tmp_path / "native", size=(64, 64))
    assert episode.frames.shape == (6, 64, 64, 3) and episode.frames.dtype == np.uint8


def test_recording_that_stops_marks_the_last_frame_truncated(tmp_path: Path) -> None:
    write_episode(tmp_path, frames_for(5), end=END_BUDGET)
    (episode,) = Dataset(tmp_path).episodes()
    assert episode.truncated.tolist() == [False] * 4 + [True] and not episode.terminated.any()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing_field", "bad_frame"])
def test_damaged_chunk_is_named_and_skipped(tmp_path: Path, damage: str) -> None:
    frames = frames_for(12)
    ep = write_episode(tmp_path, frames)
    write_episode(tmp_path, frames_for(5, seed=1))  # a healthy second episode
    bad = ep / "chunk_000001.npz"
    if damage == "truncate":
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    elif damage == "garbage":
        bad.write_bytes(np.random.default_rng(0).bytes(3000))
    else:
        with np.load(bad) as npz:
            fields = {k: npz[k] for k in npz.files}
        if damage == "missing_field":
            del fields["rewards"]
        else:
            fields["frames_data"] = np.zeros_like(fields["frames_data"])  # valid zip, undecodable PNG
        np.savez(bad, **fields)
    dataset = Dataset(tmp_path)
    pieces = list(dataset.episodes())
    assert [len(p) for p in pieces] == [4, 4, 5]  # the hole splits episode 1
    assert pieces[1].name.endswith("@8") and np.array_equal(pieces[1].frames, frames[8:])
    assert [p.path for p in dataset.problems] == [str(bad)]
    stats = compute_stats(tmp_path)
    assert stats["bad_chunks"] == [str(bad)] and stats["frames"] == 13 and stats["episodes"] == 2


def test_missing_chunk_and_leftover_temporary_file(tmp_path: Path) -> None:
    ep = write_episode(tmp_path, frames_for(12))
    (ep / "chunk_000001.npz").unlink()
    (ep / ".chunk_000003.npz.tmp").write_bytes(b"half a chunk")  # what kill -9 mid-write leaves
    dataset = Dataset(tmp_path)
    assert [len(p) for p in dataset.episodes()] == [4, 4]
    assert "frames 4..7 are missing" in dataset.problems[0].reason
    assert [p.name for p in dataset.temp_files] == [".chunk_000003.npz.tmp"]
    assert len(compute_stats(tmp_path)["lost_in_flight"]) == 1


def test_stats_counts(tmp_path: Path) -> None:
    write_episode(tmp_path, frames_for(7))
    write_episode(tmp_path, frames_for(5), end=END_BUDGET)
    stats = compute_stats(tmp_path)
    assert stats["episodes"] == 2 and stats["frames"] == 12 and stats["null_actions"] == 2
    assert sum(stats["actions"].values()) == 10 and set(stats["actions"]) <= set(META["action_names"])
    assert (
        stats["terminated"] == 1
        and stats["truncated"] == 1
        and stats["ends"] == {"terminated": 1, "budget": 1}
    )
    assert stats["controllers"] == {"random": 12} and stats["rewards"]["sum"] == 21 + 10
    assert stats["bad_chunks"] == [] and json.dumps(stats)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        Dataset(tmp_path / "nope")
