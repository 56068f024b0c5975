"""Clip batches: shapes, rank sharding, resumable position; the synthetic source."""

from __future__ import annotations

import torch

from train.data import ClipBatches, SyntheticConfig, SyntheticSource


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
