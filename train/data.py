"""Clip batches for every stage: fixed-length windows of episodes, shuffled, sharded by rank,
resumable.

A *source* is a set of episodes that can cut a clip `(episode, start, length)` into a TensorDict
with batch size `[length]` (`frames` uint8 (T, H, W, 3) or `latents` (T, h, w, c), `actions`
int64 (T,), and whatever else the episodes carry). Sources: recorded datasets (`record/`),
procedurally generated sprites (`synthetic`, for tests and smoke runs) and the pre-encoded latent
cache (`train/latents.py`) over either. `ClipBatches` turns a source into an endless iterator of
TensorDict batches `[B, T]` whose position is part of every checkpoint.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tensordict import TensorDict

from episodes.reader import Dataset, DatasetError
from train import UsageError
from train.distributed import Dist, barrier
from train.eval.split import split_ids
from train.latents import LatentSource, build_latent_cache, cached_lengths, latent_cache_dir


@dataclass
class SyntheticConfig:
    """A Breakout-like toy: a flat background, a row of bricks, a paddle the actions move and a
    2x2-pixel ball bouncing on its own. Small sprites on a flat background are exactly what a
    tokenizer tends to lose, so this is also a useful tokenizer smoke test."""

    episodes: int = 32
    episode_len: int = 128
    num_actions: int = 4      # 0 noop, 1 fire (noop here), 2 right, 3 left, as in ALE Breakout
    seed: int = 0


@dataclass
class DataConfig:
    source: str = "recorded"          # a key of SOURCES
    path: str | None = None           # dataset directory (recorded source)
    resolution: int = 64              # frames are square, resized to the model's resolution
    clip_len: int = 8                 # frames per clip
    batch_size: int = 8               # clips per batch, per rank and per micro-step
    stride: int = 1                   # between the start frames of candidate windows
    latents: bool = False             # serve tokenizer latents (cached on disk) instead of frames
    tokenizer: str | None = None      # the tokenizer stage's export dir (when latents=True)
    cache_dir: str | None = None      # latent cache root; default: <run_dir>/../latent_cache
    hold_out: bool = True             # skip the episodes `train.eval` holds out (train/eval/split.py)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


class ClipSource(Protocol):
    action_names: list[str]  # what each action id means (the objective sizes its embeddings from it)

    def episode_lengths(self) -> list[int]: ...

    def clip(self, episode: int, start: int, length: int) -> TensorDict: ...


# ----- synthetic source --------------------------------------------------------------------

PADDLE_W, PADDLE_H, BALL = 8, 2, 2        # sprite sizes in pixels at 64x64, scaled with resolution
BACKGROUND = (0, 0, 0)
BRICK_COLOURS = ((200, 72, 72), (198, 108, 58), (180, 122, 48), (162, 162, 42), (72, 160, 72), (66, 72, 200))
ACTION_NAMES = ("noop", "fire", "right", "left")


class SyntheticSource:
    """Deterministic episodes: episode i depends only on (seed, i), so any clip can be cut without
    storing anything. actions[0] is the null action (-1), as in recordings."""

    def __init__(self, cfg: SyntheticConfig, resolution: int) -> None:
        self.cfg, self.res = cfg, resolution
        self.scale = max(1, resolution // 64)
        self.action_names = [ACTION_NAMES[i] if i < len(ACTION_NAMES) else f"action{i}"
                             for i in range(cfg.num_actions)]

    def episode_lengths(self) -> list[int]:
        return [self.cfg.episode_len] * self.cfg.episodes

    def _episode(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """actions (L,), paddle x (L,), ball (x, y) (L, 2), all int."""
        rng = np.random.default_rng([self.cfg.seed, i])
        L, R = self.cfg.episode_len, self.res
        # Random actions held for a few frames, like a person or a sticky-action agent.
        holds = rng.integers(1, 6, L)
        acts = np.repeat(rng.integers(0, self.cfg.num_actions, L), holds)[:L]
        acts[0] = -1
        move = np.where(acts == 2, 1, np.where(acts == 3, -1, 0)) * 2 * self.scale
        paddle = np.empty(L, np.int64)
        x = int(rng.integers(0, R - PADDLE_W * self.scale))
        for t in range(L):  # clipped walk: not a closed form, but L is small
            x = min(max(x + move[t], 0), R - PADDLE_W * self.scale)
            paddle[t] = x
        # Ball: free bounce inside the playfield (triangle waves), per-episode start and velocity.
        lo, hi = R // 4, R - 4 * self.scale
        t = np.arange(L)
        p0, v = rng.integers(0, 10_000, 2), rng.integers(1, 3, 2) * self.scale
        span = np.array([R - BALL * self.scale, hi - lo])
        raw = (p0[None] + v[None] * t[:, None]) % (2 * span[None])
        ball = np.where(raw < span[None], raw, 2 * span[None] - raw) + np.array([0, lo])
        return acts, paddle, ball

    def clip(self, episode: int, start: int, length: int) -> TensorDict:
        acts, paddle, ball = self._episode(episode)
        R, s = self.res, self.scale
        frames = np.zeros((length, R, R, 3), np.uint8)
        frames[:] = BACKGROUND
        for row, colour in enumerate(BRICK_COLOURS):  # static bricks: the part that is easy to learn
            frames[:, (4 + 2 * row) * s:(6 + 2 * row) * s, :] = colour
        py = R - 4 * s
        for j, t in enumerate(range(start, start + length)):
            frames[j, py:py + PADDLE_H * s, paddle[t]:paddle[t] + PADDLE_W * s] = (200, 72, 72)
            bx, by = ball[t]
            frames[j, by:by + BALL * s, bx:bx + BALL * s] = (236, 236, 236)
        return TensorDict({
            "frames": torch.from_numpy(frames),
            "actions": torch.from_numpy(acts[start:start + length].astype(np.int64)),
        }, batch_size=[length])


# ----- recorded source ---------------------------------------------------------------------


class RecordedSource:
    """The episodes of a dataset written by `record/`, loaded once into memory at the model's
    resolution (12 KiB per 64x64 frame: a million frames is 12 GiB, so big datasets should go
    through the latent cache, which every stage after the tokenizer uses). Unreadable chunks are
    reported and skipped by the reader; an episode with a hole comes back as two pieces, so no
    clip spans a gap.

    frames=False reads (and checks) everything but the images: the episode layout, actions and
    rewards. That is all a stage needs when the latent cache already holds the frames, and it
    skips decoding every image (minutes for 200k frames)."""

    def __init__(self, path: Path, resolution: int, hold_out: bool = True, frames: bool = True) -> None:
        try:
            dataset = Dataset(Path(path))
            dirs = dataset.episode_dirs
            if hold_out and len(dirs) >= 2:  # evaluation's held-out episodes never train
                keep = set(split_ids([d.name for d in dirs])[0])
                dirs = [d for d in dirs if d.name in keep]
            size = (resolution, resolution)
            episodes = [ep for d in dirs for ep in dataset.read(d, frames=frames, size=size)]
        except DatasetError as e:
            raise UsageError(str(e)) from None
        if not episodes:
            raise UsageError(f"dataset directory {path} holds no readable episodes: record some with "
                             f"`python -m record ...`")
        for problem in dataset.problems:
            print(f"warning: skipped {problem.path}: {problem.reason}", file=sys.stderr)
        names = [ep.action_names for ep in episodes if ep.action_names]
        if any(n != names[0] for n in names):
            raise UsageError(f"episodes in {path} disagree on their action names; a dataset must be "
                             f"recorded with one keymap")
        self.action_names = names[0] if names else []
        self.episodes = [TensorDict({
            **({"frames": torch.from_numpy(ep.frames)} if frames else {}),
            "actions": torch.from_numpy(ep.actions),
            "rewards": torch.from_numpy(ep.rewards),
            "terminated": torch.from_numpy(ep.terminated),
            "truncated": torch.from_numpy(ep.truncated),
        }, batch_size=[len(ep)]) for ep in episodes]

    def episode_lengths(self) -> list[int]:
        return [ep.batch_size[0] for ep in self.episodes]

    def clip(self, episode: int, start: int, length: int) -> TensorDict:
        return self.episodes[episode][start:start + length]


# ----- batches -------------------------------------------------------------------------------


class ClipBatches(Iterator[TensorDict]):
    """Endless batches of clips, each a TensorDict [B, T].

    Every epoch shuffles all windows with a permutation that depends only on (seed, epoch), the
    same on every rank; rank r takes windows r, r + world, r + 2 * world, ... (a DistributedSampler
    without padding). So the iterator's whole state is (epoch, position): cheap to checkpoint, and
    a resumed run sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, source: ClipSource, batch_size: int, clip_len: int, *, stride: int = 1,
                 seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu") -> None:
        self.source, self.batch_size, self.clip_len = source, batch_size, clip_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)
        self.windows = [(e, s) for e, n in enumerate(source.episode_lengths())
                        for s in range(0, n - clip_len + 1, stride)]
        per_rank = len(self.windows) // world_size
        if per_rank < batch_size:
            raise ValueError(
                f"the data has {len(self.windows)} windows of {clip_len} frames, {per_rank} per rank: "
                f"fewer than one batch of {batch_size}; record more data or lower data.batch_size / "
                f"data.clip_len")
        self.batches_per_epoch = per_rank // batch_size
        self.epoch, self.pos = 0, 0
        self._order = self._shard(0)

    def _shard(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.windows), generator=g)
        return perm[self.rank::self.world_size].tolist()

    def __next__(self) -> TensorDict:
        if self.pos >= self.batches_per_epoch:
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._shard(self.epoch)
        idx = self._order[self.pos * self.batch_size:(self.pos + 1) * self.batch_size]
        self.pos += 1
        clips = [self.source.clip(*self.windows[i], self.clip_len) for i in idx]
        batch = torch.stack(clips)  # TensorDict [B, T]
        pin = self.device.type == "cuda"
        return (batch.pin_memory() if pin else batch).to(self.device, non_blocking=pin)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._shard(self.epoch)


# ----- building -----------------------------------------------------------------------------


def synthetic_source(cfg: DataConfig, frames: bool = True) -> SyntheticSource:
    return SyntheticSource(SyntheticConfig(**cfg.synthetic), cfg.resolution)  # frames are drawn per clip


def recorded_source(cfg: DataConfig, frames: bool = True) -> ClipSource:
    if not cfg.path:
        raise UsageError("no dataset given: pass data=<dataset dir> (a directory written by `python -m "
                         "record`), or data=synthetic for generated Breakout-like episodes")
    if not Path(cfg.path).is_dir():
        raise UsageError(f"dataset directory {cfg.path} does not exist: record one with `python -m record "
                         f"...`, or fix data=<dataset dir>")
    return RecordedSource(Path(cfg.path), cfg.resolution, cfg.hold_out, frames=frames)


SOURCES = {  # data.source -> factory(DataConfig, frames: bool) -> ClipSource
    "recorded": recorded_source,
    "synthetic": synthetic_source,
}


def build_source(cfg: DataConfig, frames: bool = True) -> ClipSource:
    """The source `cfg` names; frames=False may leave out the images (see `RecordedSource`)."""
    if cfg.source not in SOURCES:
        raise UsageError(f"unknown data.source {cfg.source!r}; choose one of {sorted(SOURCES)}")
    return SOURCES[cfg.source](cfg, frames)


def build_data(cfg: Any, *, rank: int, world_size: int, device: torch.device, run_dir: Path) -> ClipSource:
    """The clip source that `cfg` (the `data` config) describes. With `latents=True` the frames
    are replaced by cached tokenizer latents (encoded on first use by rank 0; the others wait).
    A cache whose episode lengths differ from the dataset's (episodes recorded or removed since)
    is stale and encoded again; a valid one is used without decoding a single image."""
    if not cfg.latents:
        return build_source(cfg)
    if not cfg.tokenizer or not (Path(cfg.tokenizer) / "tokenizer.json").exists():
        raise UsageError(
            f"this stage trains on tokenizer latents, but data.tokenizer={cfg.tokenizer!r} is not a "
            f"tokenizer export. Train the tokenizer first (python -m train stage=tokenizer data=... "
            f"runs_root=...) or set data.tokenizer=<its run_dir>/export.")
    root = Path(cfg.cache_dir) if cfg.cache_dir else Path(run_dir).parent / "latent_cache"
    key = f"{cfg.source}:{Path(cfg.path).resolve() if cfg.path else dict(cfg.synthetic)}:{cfg.resolution}:hold_out={cfg.hold_out}"
    out = latent_cache_dir(root, key, Path(cfg.tokenizer))
    source = build_source(cfg, frames=False)
    if rank == 0 and cached_lengths(out) != source.episode_lengths():
        build_latent_cache(build_source(cfg), Path(cfg.tokenizer), out, device=device,
                           dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    barrier(Dist(rank, world_size))
    return LatentSource(out, source.action_names)


def clip_batches(source: ClipSource, cfg: Any, *, seed: int, rank: int, world_size: int,
                 device: torch.device) -> ClipBatches:
    """This rank's batches of `cfg.batch_size` clips of `cfg.clip_len` frames from `source`."""
    return ClipBatches(source, cfg.batch_size, cfg.clip_len, stride=cfg.stride, seed=seed, rank=rank,
                       world_size=world_size, device=device)


def build_batches(cfg: Any, *, seed: int, rank: int, world_size: int, device: torch.device,
                  run_dir: Path) -> ClipBatches:
    """`build_data` then `clip_batches`, for one-off use (tests, tools)."""
    source = build_data(cfg, rank=rank, world_size=world_size, device=device, run_dir=run_dir)
    return clip_batches(source, cfg, seed=seed, rank=rank, world_size=world_size, device=device)
