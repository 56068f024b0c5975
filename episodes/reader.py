"""Reading datasets: list episodes, load them, and report unreadable chunks by file name.

A chunk that cannot be read (truncated, garbage, wrong fields, frames that do not decode) is
reported in ``Dataset.problems`` and skipped; reading goes on with the rest. Because a clip
must never span a hole, an episode with an unreadable chunk in the middle is returned as two
:class:`Episode` pieces, each contiguous.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from episodes.frames import Size, resize_frames
from episodes.codecs import check_frames, get_codec, unpack_frames
from episodes.writer import CHUNK_GLOB, META_FILE

STEP_FIELDS = ("actions", "rewards", "terminated", "truncated", "controller", "timestamps")
# What np.load / zipfile / our checks raise on a damaged chunk.
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)


class DatasetError(ValueError):
    """A dataset that cannot be used at all (missing directory, no episodes)."""


@dataclass
class ChunkProblem:
    """A file that could not be read, and why."""

    path: str
    reason: str


@dataclass
class Episode:
    """A contiguous run of recorded steps: a whole episode, or the part of one between
    unreadable chunks.

    frames:     (T, H, W, 3) uint8, or None when loaded without frames.
    actions:    (T,) int64; actions[i] led to frames[i]; -1 (NULL_ACTION) at the episode start.
    rewards:    (T,) float32, received on arriving at frame i.
    terminated, truncated: (T,) bool, Gymnasium's flags on the frame where the episode ended.
    controller: (T,) str, who chose each action (human, random, explorer, replay, ...).
    timestamps: (T,) float64 wall-clock seconds since the epoch.
    positions:  (T, 2) float32 map position if the game exposes one (NaN where unknown), else None.
    start:      index of this piece's first frame within the recorded episode.
    """

    path: Path
    meta: dict[str, Any]
    start: int
    frames: np.ndarray | None
    actions: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    controller: np.ndarray
    timestamps: np.ndarray
    positions: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def name(self) -> str:
        """Episode directory name, with ``@start`` for a piece that does not start at frame 0."""
        return self.path.name if self.start == 0 else f"{self.path.name}@{self.start}"

    @property
    def action_names(self) -> list[str]:
        return list(self.meta.get("action_names", []))


@dataclass
class Dataset:
    """A directory of recorded episodes (each a subdirectory with meta.json and chunks)."""

    root: Path
    problems: list[ChunkProblem] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not self.root.is_dir():
            what = "is a file, not a dataset directory" if self.root.exists() else "does not exist"
            raise DatasetError(
                f"dataset directory {self.root} {what}: pass the --out directory of a "
                "`python -m record collect` run"
            )

    @property
    def episode_dirs(self) -> list[Path]:
        """Episode directories, oldest first (names sort by creation time)."""
        return sorted(
            d
            for d in self.root.iterdir()
            if d.is_dir() and ((d / META_FILE).exists() or any(d.glob(CHUNK_GLOB)))
        )

    @property
    def temp_files(self) -> list[Path]:
        """Chunks that were being written when their writer died (never renamed into place)."""
        return sorted(t for d in self.episode_dirs for t in d.glob(".*.tmp"))

    def meta(self, episode_dir: Path) -> dict[str, Any]:
        """An episode's metadata ({} and a reported problem if meta.json is unreadable)."""
        path = Path(episode_dir) / META_FILE
        try:
            meta = json.loads(path.read_text())
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
            return meta
        except (OSError, ValueError) as err:
            self._report(path, f"unreadable metadata: {err}")
            return {}

    def read(self, episode_dir: Path, frames: bool = True, size: Size | None = None) -> list[Episode]:
        """Load one episode directory as contiguous pieces (usually exactly one).

        frames: decode frames (False reads and checks everything but leaves ``frames`` None).
        size:   resize frames to (h, w) while loading (INTER_AREA), or None for stored size.
        """
        episode_dir = Path(episode_dir)
        meta = self.meta(episode_dir)
        pieces: list[Episode] = []
        parts: list[dict[str, np.ndarray]] = []
        expected = 0  # index the next chunk should start at; a jump means a hole
        skipped = False  # a bad chunk was reported since the last good one (explains a hole)
        for path in sorted(episode_dir.glob(CHUNK_GLOB)):
            try:
                chunk = read_chunk(path, frames=frames, size=size)
            except _READ_ERRORS as err:
                self._report(path, f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)
                skipped = True
                continue
            first = int(chunk["first_index"])
            if first != expected and parts:
                pieces.append(_join(episode_dir, meta, parts))
                parts = []
            if first != expected and not skipped:
                self._report(episode_dir, f"frames {expected}..{first - 1} are missing")
            skipped = False
            parts.append(chunk)
            expected = first + len(chunk["actions"])
        if parts:
            pieces.append(_join(episode_dir, meta, parts))
        return pieces

    def episodes(self, frames: bool = True, size: Size | None = None) -> Iterator[Episode]:
        """All readable episode pieces, in directory order (problems collect in ``problems``)."""
        for episode_dir in self.episode_dirs:
            yield from self.read(episode_dir, frames=frames, size=size)

    def _report(self, path: Path, reason: str) -> None:
        self.problems.append(ChunkProblem(str(path), reason))


def read_chunk(path: Path, frames: bool = True, size: Size | None = None) -> dict[str, np.ndarray]:
    """Read and check one chunk file. Raises one of the read errors if it is damaged.

    Every member is read, so the zip CRC checks every byte even when ``frames`` is False; each
    frame's image signature is checked too, but frames are decoded only when ``frames`` is True.
    """
    with np.load(path, allow_pickle=False) as npz:
        fields = {name: npz[name] for name in npz.files}
    for name in ("codec", "first_index", *STEP_FIELDS):
        if name not in fields:
            raise KeyError(f"missing field {name!r}")
    n = len(fields["actions"])
    for name in (*STEP_FIELDS, "positions"):
        if name in fields and len(fields[name]) != n:
            raise ValueError(f"field {name!r} has {len(fields[name])} entries, actions has {n}")
    codec = get_codec(str(fields["codec"]))
    count = check_frames(fields, codec)  # offsets and image signatures, without decoding
    if count != n:
        raise ValueError(f"{count} frames for {n} steps")
    if frames:
        fields["frames"] = resize_frames(unpack_frames(fields, codec), size)
    for name in ("frames_data", "frames_offsets"):
        fields.pop(name, None)
    if not frames:
        fields.pop("frames", None)
    return fields


def _join(episode_dir: Path, meta: dict[str, Any], parts: list[dict[str, np.ndarray]]) -> Episode:
    """Concatenate consecutive chunks into one Episode."""

    def cat(name: str) -> np.ndarray:
        return np.concatenate([p[name] for p in parts])

    positions = None
    if any("positions" in p for p in parts):
        positions = np.concatenate(
            [p.get("positions", np.full((len(p["actions"]), 2), np.nan, np.float32)) for p in parts]
        )
    return Episode(
        path=episode_dir,
        meta=meta,
        start=int(parts[0]["first_index"]),
        frames=cat("frames") if "frames" in parts[0] else None,
        actions=cat("actions").astype(np.int64),
        rewards=cat("rewards").astype(np.float32),
        terminated=cat("terminated").astype(bool),
        truncated=cat("truncated").astype(bool),
        controller=cat("controller").astype(str),
        timestamps=cat("timestamps").astype(np.float64),
        positions=positions,
    )


def iter_episodes(root: Path | str, size: Size | None = (64, 64)) -> Iterator[Episode]:
    """Whole episodes (contiguous pieces) with frames at model resolution, e.g. to pre-encode
    latents. Unreadable chunks are skipped; use :class:`Dataset` to see which."""
    yield from Dataset(Path(root)).episodes(frames=True, size=size)
