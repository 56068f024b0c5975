"""Clip batches: shapes, rank sharding, resumable position; the synthetic and recorded sources."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from episodes.writer import EpisodeWriter
from train.app import compose_config, main
from train.data import ClipBatches, SyntheticConfig, SyntheticSource, build_data, clip_batches


def source() -> SyntheticSource:
    return SyntheticSource(SyntheticConfig(episodes=4, episode_len=20), 64)


def test_synthetic_clips_follow_the_conventions() -> None:
    clip = source().clip(2, 5, 6)
    assert clip["frames"].shape == (6, 64, 64, 3) and clip["frames"].dtype == torch.uint8
    assert clip["actions"].shape == (6,) and clip["actions"].dtype == torch.int64
    assert source().clip(0, 0, 3)["actions"][0] == -1  # frame 0 of an episode: the null action
    # Deterministic: the same clip twice, and overlapping clips agree.
    assert torch.equal(source().clip(2, 5, 6)["frames"], clip["frames"])
    assert torch.equal(source().clip(2, 7, 2)["frames"], clip["frames"][2:4])
    # Something moves between frames (the ball at least).
    assert not torch.equal(clip["frames"][0], clip["frames"][-1])


def test_ranks_get_disjoint_shards_and_resume_continues_exactly() -> None:
    kw = dict(batch_size=3, clip_len=4, stride=2, seed=1)
    ranks = [ClipBatches(source(), rank=r, world_size=2, **kw) for r in range(2)]
    assert all(r.batches_per_epoch >= 2 for r in ranks)
    seen = [[clip["frames"].numpy().tobytes() for _ in range(r.batches_per_epoch) for clip in next(r)]
            for r in ranks]
    assert len(set(seen[0])) == len(seen[0]) and not set(seen[0]) & set(seen[1])
    # Save the position mid-stream (across an epoch boundary), restore it into a fresh iterator.
    a = ClipBatches(source(), **kw)
    for _ in range(a.batches_per_epoch + 1):
        next(a)
    b = ClipBatches(source(), **kw)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        x, y = next(a), next(b)
        assert torch.equal(x["frames"], y["frames"]) and torch.equal(x["actions"], y["actions"])
    assert x.batch_size == torch.Size([3, 4])


def write_dataset(root: Path, episodes: int = 2, length: int = 10, damage: bool = True) -> None:
    """A tiny recorded dataset at 80x96 native size (so loading must resize), one damaged chunk."""
    for e in range(episodes):
        w = EpisodeWriter(root, {"game": "toy", "action_names": ["noop", "left", "right"]}, (80, 96, 3),
                          codec="png", chunk_frames=5)
        for t in range(length):
            frame = np.zeros((80, 96, 3), np.uint8)
            frame[10 + t:14 + t, 20 + e:24 + e] = 255
            w.add(frame, -1 if t == 0 else t % 3, reward=float(t))
        w.close()
    if not damage:
        return
    # Truncate the second chunk of the last episode: reading reports it and keeps the rest.
    chunk = sorted(root.glob("*/chunk_*.npz"))[-1]
    chunk.write_bytes(chunk.read_bytes()[:50])


def test_recorded_dataset_batches(tmp_path: Path, capsys) -> None:
    write_dataset(tmp_path / "data")
    cfg = compose_config([f"data={tmp_path / 'data'}", "data.clip_len=4", "data.batch_size=3",
                          "data.hold_out=false"])
    source = build_data(cfg.data, rank=0, world_size=1, device=torch.device("cpu"), run_dir=tmp_path)
    assert source.action_names == ["noop", "left", "right"]
    assert sorted(source.episode_lengths()) == [5, 10]  # the damaged chunk's 5 frames are gone
    assert "warning: skipped" in capsys.readouterr().err
    batch = next(clip_batches(source, cfg.data, seed=0, rank=0, world_size=1, device=torch.device("cpu")))
    assert batch["frames"].shape == (3, 4, 64, 64, 3) and batch["frames"].dtype == torch.uint8
    assert batch["actions"].dtype == torch.int64 and batch["rewards"].shape == (3, 4)


def test_training_skips_the_held_out_episodes(tmp_path: Path) -> None:
    write_dataset(tmp_path / "data", episodes=3)
    cfg = compose_config([f"data={tmp_path / 'data'}", "data.clip_len=4", "data.batch_size=1"])
    source = build_data(cfg.data, rank=0, world_size=1, device=torch.device("cpu"), run_dir=tmp_path)
    # 3 episodes: evaluation holds out the last one (ceil(0.1 * 3) = 1), whose chunk is also damaged
    assert sorted(source.episode_lengths()) == [10, 10]


def test_tokenizer_stage_runs_on_a_recorded_dataset(tmp_path: Path) -> None:
    write_dataset(tmp_path / "data")
    argv = ["stage=tokenizer", f"data={tmp_path / 'data'}", "model=tiny", f"runs_root={tmp_path / 'runs'}",
            "max_steps=2", "data.batch_size=4", "stage.norm_batches=1", "progress=false", "device=cpu"]
    assert main(argv) == 0
    assert (tmp_path / "runs" / "tokenizer" / "export" / "tokenizer.safetensors").exists()
