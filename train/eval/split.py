"""The held-out split, and the real clips evaluation scores against.

Split rule (deterministic, independent of any model): a dataset's episode directories, sorted by
name (episode ids sort by creation time, so this is recording order), are split into training
episodes and held-out episodes = the LAST ``max(1, ceil(0.1 * n))`` of them. Training stages
should skip the held-out ids (``split_ids(...)[1]``); evaluation reads only those, except for
the model-independent reference (probe, mean frame), which is fitted on the training ids. A
single-episode dataset is not split (training uses it whole; evaluation warns and scores it).

Evaluation clips: in each held-out episode (a contiguous piece of it, when a damaged chunk cut
it in two), ``starts`` anchor frames are spread evenly over the frames that have ``context``
real frames up to and including the anchor and ``horizon`` real frames after it. The anchor is
the last context frame; horizon h is scored on the frame ``anchor + h``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from episodes.reader import Dataset, DatasetError, Episode
from train import UsageError

HELD_OUT_FRACTION = 0.1


def held_out_count(n: int, fraction: float = HELD_OUT_FRACTION) -> int:
    """How many of ``n`` episodes are held out: ceil(fraction * n), at least 1."""
    return max(1, math.ceil(fraction * n)) if n > 0 else 0


def split_ids(ids: list[str], fraction: float = HELD_OUT_FRACTION) -> tuple[list[str], list[str]]:
    """(training ids, held-out ids): the last ``held_out_count`` of the sorted ids are held out."""
    ids = sorted(ids)
    k = held_out_count(len(ids), fraction)
    return ids[:len(ids) - k], ids[len(ids) - k:]


def open_dataset(path: str | Path) -> Dataset:
    try:
        return Dataset(Path(path))
    except DatasetError as e:
        raise UsageError(str(e)) from None


def split_dirs(dataset: Dataset, fraction: float = HELD_OUT_FRACTION) -> tuple[list[Path], list[Path]]:
    """(training episode dirs, held-out episode dirs) of a dataset.

    A dataset of ONE episode cannot be split, and training (train/data.py) then uses it whole;
    evaluation scores it anyway, with a warning, fitting the probe on it too: numbers on training
    data, better than none for a smoke run, not for a report."""
    dirs = {d.name: d for d in dataset.episode_dirs}
    if not dirs:
        raise UsageError(f"dataset directory {dataset.root} holds no episodes: record some with "
                         f"`python -m record collect ...`")
    if len(dirs) == 1:
        print(f"warning: {dataset.root} has a single episode, so nothing is held out: evaluating on the "
              f"episode training used; record more episodes for held-out numbers", file=sys.stderr)
        only = list(dirs.values())
        return only, only
    train, held = split_ids(list(dirs), fraction)
    return [dirs[i] for i in train], [dirs[i] for i in held]


def read_episodes(dataset: Dataset, dirs: list[Path], size: int) -> Iterator[Episode]:
    """The readable pieces of these episodes with frames at size x size; damaged chunks are
    reported once on stderr and skipped (as training does)."""
    seen = len(dataset.problems)
    for d in dirs:
        yield from dataset.read(d, frames=True, size=(size, size))
        for p in dataset.problems[seen:]:
            print(f"warning: skipped {p.path}: {p.reason}", file=sys.stderr)
        seen = len(dataset.problems)


@dataclass
class Clips:
    """Real evaluation clips, one row per (episode, anchor).

    frames  uint8 (N, context + horizon, H, W, 3): context frames end at index ``context - 1``
            (the anchor), the future follows.
    actions int64 (N, context + horizon): actions[i] led to frames[i].
    episode (N,) names of the episode pieces; anchor (N,) the anchor's index in its piece.
    """

    frames: np.ndarray
    actions: np.ndarray
    episode: list[str]
    anchor: list[int]
    context: int
    horizon: int

    def __len__(self) -> int:
        return len(self.frames)

    def context_frames(self, n: int) -> np.ndarray:
        """The last ``n`` context frames of every clip, (N, n, H, W, 3)."""
        return self.frames[:, self.context - n:self.context]

    def context_actions(self, n: int) -> np.ndarray:
        return self.actions[:, self.context - n:self.context]

    @property
    def future_frames(self) -> np.ndarray:
        return self.frames[:, self.context:]

    @property
    def future_actions(self) -> np.ndarray:
        return self.actions[:, self.context:]

    @property
    def last_context(self) -> np.ndarray:
        return self.frames[:, self.context - 1]


def anchors(length: int, context: int, horizon: int, starts: int) -> list[int]:
    """Up to ``starts`` anchors spread evenly over [context - 1, length - 1 - horizon]."""
    lo, hi = context - 1, length - 1 - horizon
    if hi < lo:
        return []
    return sorted({int(round(x)) for x in np.linspace(lo, hi, starts)})


def held_out_clips(dataset: Dataset, held_dirs: list[Path], size: int, context: int, horizon: int,
                   starts: int, episodes: int | None = None) -> tuple[Clips, list[Episode]]:
    """Evaluation clips from the held-out episodes (the first ``episodes`` of them, if given),
    and the episode pieces themselves (the reward-head check scores every transition of them)."""
    dirs = held_dirs[:episodes] if episodes else held_dirs
    pieces = list(read_episodes(dataset, dirs, size))
    need = context + horizon
    frames, actions, names, where = [], [], [], []
    for ep in pieces:
        for a in anchors(len(ep), context, horizon, starts):
            frames.append(ep.frames[a - context + 1:a + 1 + horizon])
            actions.append(ep.actions[a - context + 1:a + 1 + horizon])
            names.append(ep.name)
            where.append(a)
    if not frames:
        longest = max((len(ep) for ep in pieces), default=0)
        raise UsageError(
            f"no held-out episode is long enough: scoring horizon {horizon} after {context} context frames "
            f"needs {need} frames, the longest of the {len(pieces)} held-out episode piece(s) has {longest}. "
            f"Pass smaller horizons=... (at most {max(longest - context, 0)}) or record longer episodes")
    return Clips(np.stack(frames), np.stack(actions), names, where, context, horizon), pieces
