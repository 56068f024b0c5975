"""Training batches: random fixed-length clips at model resolution, as TensorDicts.

Decoding PNGs and resizing on every draw would cost ~1.7 ms per 320x240 frame, as much as a
training step on 2 cores. So each episode is decoded and resized once, into a cache of uint8
``.npy`` files (default ``<dataset>/.cache``) that later runs memory-map; drawing a clip is then
a slice of a memory map. The cache is keyed by the episode's chunk files (name, size, mtime)
and the size, so an episode still being recorded is re-cached when new chunks land.

A clip never crosses an episode boundary, nor a hole left by an unreadable chunk.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict
from tqdm import tqdm

from envs.preprocess import Size
from record.reader import ChunkProblem, Dataset, DatasetError
from record.writer import CHUNK_GLOB, atomic_write

CACHE_VERSION = 1


@dataclass
class _Track:
    """One episode directory at model resolution: frames of all its readable pieces, end to end."""

    frames: np.ndarray  # (N, h, w, 3) uint8, usually a read-only memory map
    actions: np.ndarray  # (N,) int64
    rewards: np.ndarray  # (N,) float32
    terminated: np.ndarray  # (N,) bool
    truncated: np.ndarray  # (N,) bool
    frame_index: np.ndarray  # (N,) int64, index of each frame within its recorded episode
    starts: np.ndarray  # (S,) int64: every offset where a whole clip fits inside one piece


class ClipSampler:
    """Samples clips of ``clip_len`` consecutive frames, uniformly over all valid positions.

    root:      dataset directory.
    clip_len:  frames per clip (T).
    size:      (h, w) model resolution.
    cache_dir: where decoded episodes are kept; None for ``<root>/.cache``, False for memory only.
    seed:      seed of the sampling RNG.
    """

    def __init__(
        self,
        root: Path | str,
        clip_len: int,
        size: Size = (64, 64),
        cache_dir: Path | str | None | bool = None,
        seed: int | None = None,
        progress: bool = False,
    ) -> None:
        self.dataset = Dataset(Path(root))
        self.clip_len = clip_len
        self.size = tuple(size)
        if cache_dir is None:
            cache_dir = self.dataset.root / ".cache"
        self.cache_dir = Path(cache_dir) if cache_dir is not False else None
        self.rng = np.random.default_rng(seed)
        self.problems: list[ChunkProblem] = self.dataset.problems
        dirs = self.dataset.episode_dirs
        if not dirs:
            raise DatasetError(f"no episodes in {root}: record some with `python -m record collect`")
        self.tracks = [
            self._load(d) for d in tqdm(dirs, desc="clips: loading episodes", disable=not progress)
        ]
        self.tracks = [t for t in self.tracks if len(t.starts)]
        if not self.tracks:
            raise DatasetError(f"no episode in {root} has {clip_len} consecutive readable frames")
        weights = np.array([len(t.starts) for t in self.tracks], dtype=np.float64)
        self._track_p = weights / weights.sum()

    def __len__(self) -> int:
        """Number of distinct clips (valid start positions)."""
        return int(sum(len(t.starts) for t in self.tracks))

    @property
    def frames(self) -> int:
        return int(sum(len(t.actions) for t in self.tracks))

    def sample(self, batch_size: int) -> TensorDict:
        """A batch of clips, batch_size [B, T]:

        frames      uint8 (B, T, h, w, 3)
        actions     int64 (B, T); actions[:, t] led to frames[:, t]; -1 at an episode's first frame
        rewards     float32 (B, T)
        terminated  bool (B, T)
        truncated   bool (B, T)
        episode     int64 (B, T) index of the source episode (in this sampler)
        frame_index int64 (B, T) index of each frame within its episode
        """
        T = self.clip_len
        picks = self.rng.choice(len(self.tracks), size=batch_size, p=self._track_p)
        frames = np.empty((batch_size, T, *self.size, 3), dtype=np.uint8)
        fields = {k: [] for k in ("actions", "rewards", "terminated", "truncated", "frame_index")}
        for b, i in enumerate(picks):
            track = self.tracks[i]
            s = int(track.starts[self.rng.integers(len(track.starts))])
            frames[b] = track.frames[s : s + T]
            for k, values in fields.items():
                values.append(getattr(track, k)[s : s + T])
        data = {k: torch.from_numpy(np.stack(v)) for k, v in fields.items()}
        data["frames"] = torch.from_numpy(frames)
        data["episode"] = torch.from_numpy(np.repeat(picks[:, None], T, axis=1).astype(np.int64))
        return TensorDict(data, batch_size=[batch_size, T])

    def batches(self, batch_size: int) -> Iterator[TensorDict]:
        """An endless stream of :meth:`sample` batches."""
        while True:
            yield self.sample(batch_size)

    def _load(self, episode_dir: Path) -> _Track:
        key = self._cache_key(episode_dir)
        if self.cache_dir is not None:
            cached = self._read_cache(episode_dir, key)
            if cached is not None:
                return cached
        pieces = self.dataset.read(episode_dir, frames=True, size=self.size)
        h, w = self.size
        frames = np.concatenate([p.frames for p in pieces]) if pieces else np.zeros((0, h, w, 3), np.uint8)
        steps = {
            "actions": np.concatenate([p.actions for p in pieces]) if pieces else np.zeros(0, np.int64),
            "rewards": np.concatenate([p.rewards for p in pieces]) if pieces else np.zeros(0, np.float32),
            "terminated": np.concatenate([p.terminated for p in pieces]) if pieces else np.zeros(0, bool),
            "truncated": np.concatenate([p.truncated for p in pieces]) if pieces else np.zeros(0, bool),
            "frame_index": np.concatenate([p.start + np.arange(len(p)) for p in pieces])
            if pieces
            else np.zeros(0, np.int64),
            "lengths": np.array([len(p) for p in pieces], dtype=np.int64),
        }
        if self.cache_dir is not None:
            frames = self._write_cache(episode_dir, key, frames, steps)
        return self._track(frames, steps)

    def _track(self, frames: np.ndarray, steps: dict[str, np.ndarray]) -> _Track:
        # Valid starts: in each piece, offsets 0..len-T (a clip must not straddle a hole).
        starts, offset = [], 0
        for length in steps["lengths"].tolist():
            if length >= self.clip_len:
                starts.append(offset + np.arange(length - self.clip_len + 1))
            offset += length
        return _Track(
            frames=frames,
            actions=steps["actions"].astype(np.int64),
            rewards=steps["rewards"].astype(np.float32),
            terminated=steps["terminated"].astype(bool),
            truncated=steps["truncated"].astype(bool),
            frame_index=steps["frame_index"].astype(np.int64),
            starts=np.concatenate(starts) if starts else np.zeros(0, np.int64),
        )

    def _cache_key(self, episode_dir: Path) -> str:
        h = hashlib.sha1(f"v{CACHE_VERSION} {self.size}".encode())
        for chunk in sorted(episode_dir.glob(CHUNK_GLOB)):
            st = chunk.stat()
            h.update(f"{chunk.name} {st.st_size} {st.st_mtime_ns};".encode())
        return h.hexdigest()[:16]

    def _cache_paths(self, episode_dir: Path, key: str) -> tuple[Path, Path]:
        assert self.cache_dir is not None
        stem = f"{episode_dir.name}.{self.size[0]}x{self.size[1]}.{key}"
        return self.cache_dir / f"{stem}.frames.npy", self.cache_dir / f"{stem}.steps.npz"

    def _read_cache(self, episode_dir: Path, key: str) -> _Track | None:
        frames_path, steps_path = self._cache_paths(episode_dir, key)
        if not (frames_path.exists() and steps_path.exists()):
            return None
        try:
            frames = np.load(frames_path, mmap_mode="r")
            with np.load(steps_path) as npz:
                steps = {k: npz[k] for k in npz.files}
        except (OSError, ValueError):
            return None  # a damaged cache is rebuilt
        for path, reason in zip(steps.pop("problem_paths", []), steps.pop("problem_reasons", [])):
            self.problems.append(ChunkProblem(str(path), str(reason)))
        return self._track(frames, steps)

    def _write_cache(
        self, episode_dir: Path, key: str, frames: np.ndarray, steps: dict[str, np.ndarray]
    ) -> np.ndarray:
        """Store one episode's cache (atomically) and return its frames as a memory map."""
        assert self.cache_dir is not None
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError:
            self.cache_dir = None  # read-only dataset: keep everything in memory
            return frames
        frames_path, steps_path = self._cache_paths(episode_dir, key)
        prefix = f"{episode_dir.name}.{self.size[0]}x{self.size[1]}."
        for stale in self.cache_dir.glob(prefix + "*"):  # older versions of a growing episode
            if key not in stale.name:
                stale.unlink(missing_ok=True)
        mine = [
            p
            for p in self.problems
            if p.path.startswith(str(episode_dir) + os.sep) or p.path == str(episode_dir)
        ]
        extra = {
            "problem_paths": np.array([p.path for p in mine], dtype=str),
            "problem_reasons": np.array([p.reason for p in mine], dtype=str),
        }
        atomic_write(frames_path, lambda f: np.save(f, frames))
        atomic_write(steps_path, lambda f: np.savez(f, **steps, **extra))
        return np.load(frames_path, mmap_mode="r")
