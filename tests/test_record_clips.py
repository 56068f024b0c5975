"""Clip sampling: fixed-length TensorDict batches at model resolution, never across episodes."""

from pathlib import Path

import numpy as np
import pytest
import torch

from record.clips import ClipSampler
from record.reader import DatasetError
from record.writer import NULL_ACTION, EpisodeWriter

LENGTHS = (9, 30, 14)  # episode lengths; clips of 8 fit 2, 23 and 7 ways


def write_dataset(root: Path, lengths=LENGTHS, chunk_frames: int = 5) -> None:
    """Frames whose colour encodes (episode, index): red = index, green = 50 * episode."""
    for e, n in enumerate(lengths):
        writer = EpisodeWriter(
            root, {"game": "toy", "action_names": ["a", "b", "c"]}, (20, 24, 3), chunk_frames=chunk_frames
        )
        for i in range(n):
            frame = np.zeros((20, 24, 3), np.uint8)
            frame[..., 0], frame[..., 1] = i, 50 * e
            writer.add(frame, NULL_ACTION if i == 0 else i % 3, reward=float(i), terminated=i == n - 1)
        writer.close()


def check_clip_integrity(batch) -> None:
    """Every clip is consecutive frames of one episode, with their own actions and rewards."""
    frames = batch["frames"]
    red, green = frames[..., 0].float().mean((-1, -2)), frames[..., 1].float().mean((-1, -2))
    assert torch.all(green == green[:, :1])  # one episode per clip
    assert torch.all(red[:, 1:] - red[:, :-1] == 1)  # consecutive frames
    assert torch.equal(red.long(), batch["frame_index"])
    expected = torch.where(batch["frame_index"] == 0, NULL_ACTION, batch["frame_index"] % 3)
    assert torch.equal(batch["actions"], expected) and torch.equal(batch["rewards"], red)


def test_batches_have_the_promised_shapes(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    sampler = ClipSampler(tmp_path, clip_len=8, seed=0)
    assert len(sampler) == 2 + 23 + 7 and sampler.frames == sum(LENGTHS)
    batch = sampler.sample(6)
    assert batch.batch_size == torch.Size([6, 8])
    assert batch["frames"].shape == (6, 8, 64, 64, 3) and batch["frames"].dtype == torch.uint8
    assert batch["actions"].dtype == torch.int64 and batch["rewards"].dtype == torch.float32
    assert batch["terminated"].dtype == torch.bool and batch["truncated"].dtype == torch.bool


def test_clips_never_cross_episodes_and_cover_every_start(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    sampler = ClipSampler(tmp_path, clip_len=8, size=(16, 16), seed=1)
    seen = set()
    for _ in range(40):
        batch = sampler.sample(16)
        check_clip_integrity(batch)
        ends = batch["terminated"][:, :-1]
        assert not ends.any()  # an episode's last frame can only be a clip's last frame
        seen |= set(zip(batch["episode"][:, 0].tolist(), batch["frame_index"][:, 0].tolist()))
    assert len(seen) == len(sampler)  # uniform over all 32 starts: all of them show up


def test_a_hole_from_a_bad_chunk_is_never_crossed(tmp_path: Path) -> None:
    write_dataset(tmp_path, lengths=(30,))
    (bad,) = tmp_path.glob("*/chunk_000002.npz")  # frames 10..14
    bad.write_bytes(b"not a zip")
    sampler = ClipSampler(tmp_path, clip_len=6, seed=0)
    assert [p.path for p in sampler.problems] == [str(bad)]
    assert len(sampler) == (10 - 5) + (15 - 5)
    for _ in range(20):
        check_clip_integrity(sampler.sample(8))
    # the decoded-episode cache remembers the problem for the next run
    again = ClipSampler(tmp_path, clip_len=6, seed=0)
    assert [p.path for p in again.problems] == [str(bad)]


def test_cache_is_reused_and_memory_only_mode(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    a = ClipSampler(tmp_path, clip_len=8, seed=3)
    cached = sorted(p.name for p in (tmp_path / ".cache").iterdir())
    assert len(cached) == 2 * len(LENGTHS)
    b = ClipSampler(tmp_path, clip_len=8, seed=3)
    assert isinstance(b.tracks[0].frames, np.memmap)
    assert torch.equal(a.sample(4)["frames"], b.sample(4)["frames"])
    c = ClipSampler(tmp_path, clip_len=8, seed=5, cache_dir=False)
    d = ClipSampler(tmp_path, clip_len=8, seed=5)
    assert not isinstance(c.tracks[0].frames, np.memmap)
    assert torch.equal(c.sample(4)["frames"], d.sample(4)["frames"])


def test_too_short_or_empty_datasets(tmp_path: Path) -> None:
    write_dataset(tmp_path / "short", lengths=(5,))
    with pytest.raises(DatasetError, match="8 consecutive"):
        ClipSampler(tmp_path / "short", clip_len=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no episodes"):
        ClipSampler(tmp_path / "empty", clip_len=8)
