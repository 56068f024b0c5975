"""EpisodeWriter: records one episode as a directory of atomically written chunks.

Every file lands by write-to-temporary, fsync, ``os.replace``: a reader, or a crash at any
moment, sees either the whole file or none of it. A ``kill -9`` therefore loses at most the
chunk in flight (at most ``chunk_frames`` frames or ``chunk_seconds`` of play); everything
written before it stays readable. See episodes/FORMAT.md for the layout.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np

from episodes.frames import Size, resize_frames
from episodes.codecs import encode_frame, get_codec, pack_frames

FORMAT_NAME = "worldmodel-episode"
FORMAT_VERSION = 1
META_FILE = "meta.json"
CHUNK_GLOB = "chunk_*.npz"
NULL_ACTION = -1  # action[0] of every episode: nothing was pressed before the first frame

# How an episode ended (meta "end"). The first two come from the game; the others from recording.
END_TERMINATED, END_TRUNCATED = "terminated", "truncated"
END_BUDGET = "budget"  # the session's --frames / --max-episode-frames ran out
END_INTERRUPTED = "interrupted"  # SIGINT/SIGTERM, or the player closed the window
END_CONTROLLER = "controller"  # the controller had nothing more to do (replay ran out)


def chunk_name(index: int) -> str:
    """File name of chunk ``index`` (zero-padded so names sort in episode order)."""
    return f"chunk_{index:06d}.npz"


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` so that it appears complete or not at all (temp file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp")  # hidden: never matches the chunk glob
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    # fsync the directory too, so the rename itself survives a power cut.
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically write ``data`` as indented JSON."""
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=1, default=_json_default).encode()))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def new_episode_id(root: Path) -> str:
    """A unique, time-sortable episode directory name: ``ep-YYYYmmdd-HHMMSS-<pid>-<n>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(10_000):
        name = f"ep-{stamp}-{os.getpid()}-{n:04d}"
        if not (root / name).exists():
            return name
    raise RuntimeError(f"could not find a free episode name in {root}")


class EpisodeWriter:
    """Append frames of one episode; chunks are flushed every ``chunk_frames`` frames or
    ``chunk_seconds`` seconds, whichever comes first (the latter bounds what a crash loses in a
    slow human session).

    root:         dataset directory (created if missing); the episode gets its own subdirectory.
    meta:         episode metadata (game, seed, fps, action names, keymap, controller, ...).
    native_shape: (H, W, 3) of the frames the game produces.
    codec:        frame codec name (episodes.codecs.CODECS).
    size:         (h, w) to store frames at, or None for native size.
    """

    def __init__(
        self,
        root: Path | str,
        meta: dict[str, Any],
        native_shape: tuple[int, ...],
        codec: str = "png",
        size: Size | None = None,
        chunk_frames: int = 256,
        chunk_seconds: float = 10.0,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.episode_id = new_episode_id(self.root)
        self.dir = self.root / self.episode_id
        self.dir.mkdir()
        self.codec = get_codec(codec)
        self.size = size
        self.chunk_frames = max(1, chunk_frames)
        self.chunk_seconds = chunk_seconds
        stored = (size[0], size[1], 3) if size else tuple(native_shape)
        self.meta: dict[str, Any] = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "episode_id": self.episode_id,
            **meta,
            "native_shape": list(native_shape),
            "frame_shape": list(stored),
            "codec": self.codec.name,
            "null_action": NULL_ACTION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "closed": False,
        }
        write_json(self.dir / META_FILE, self.meta)
        self.frames_written = 0  # frames already in chunk files
        self.chunks_written = 0
        self.total_reward = 0.0
        self._pending: dict[str, list] = _empty_pending()
        self._chunk_started = time.monotonic()
        self._closed = False

    @property
    def frames(self) -> int:
        """Frames recorded so far (written and pending)."""
        return self.frames_written + len(self._pending["actions"])

    def add(
        self,
        frame: np.ndarray,
        action: int,
        reward: float = 0.0,
        terminated: bool = False,
        truncated: bool = False,
        controller: str = "",
        timestamp: float | None = None,
        position: np.ndarray | None = None,
    ) -> None:
        """Record frame i and what led to it: ``action`` was pressed between frame i-1 and i
        (NULL_ACTION for frame 0), ``reward`` was received on arriving at frame i.

        frame: (H, W, 3) uint8 at native size; it is resized here if the writer has a size.
        """
        if self._closed:
            raise RuntimeError(f"episode {self.episode_id} is already closed")
        # Flush *before* adding, so the last frame is always pending at close() and can still be
        # marked truncated when recording stops mid-episode.
        if len(self._pending["actions"]) >= self.chunk_frames or (
            self._pending["actions"] and time.monotonic() - self._chunk_started >= self.chunk_seconds
        ):
            self.flush()
        p = self._pending
        p["frames"].append(encode_frame(resize_frames(frame, self.size), self.codec))
        p["actions"].append(int(action))
        p["rewards"].append(float(reward))
        p["terminated"].append(bool(terminated))
        p["truncated"].append(bool(truncated))
        p["controller"].append(controller)
        p["timestamps"].append(time.time() if timestamp is None else float(timestamp))
        p["positions"].append(
            np.full(2, np.nan, np.float32) if position is None else np.asarray(position, np.float32)[:2]
        )
        self.total_reward += float(reward)

    def flush(self) -> None:
        """Write the pending frames as the next chunk (no-op when nothing is pending)."""
        p = self._pending
        n = len(p["actions"])
        if n == 0:
            return
        fields: dict[str, np.ndarray] = {
            "codec": np.array(self.codec.name),
            "first_index": np.array(self.frames_written, dtype=np.int64),
            **pack_frames(p["frames"], self.codec),
            "actions": np.array(p["actions"], dtype=np.int64),
            "rewards": np.array(p["rewards"], dtype=np.float32),
            "terminated": np.array(p["terminated"], dtype=bool),
            "truncated": np.array(p["truncated"], dtype=bool),
            "controller": np.array(p["controller"], dtype=str),
            "timestamps": np.array(p["timestamps"], dtype=np.float64),
        }
        positions = np.stack(p["positions"])
        if not np.isnan(positions).all():
            fields["positions"] = positions
        # Frames are already compressed by their codec: a plain (stored) zip, except raw frames.
        save = np.savez_compressed if self.codec.ext is None else np.savez
        atomic_write(self.dir / chunk_name(self.chunks_written), lambda f: save(f, **fields))
        self.frames_written += n
        self.chunks_written += 1
        self._pending = _empty_pending()
        self._chunk_started = time.monotonic()

    def close(self, end: str = END_TERMINATED) -> dict[str, Any]:
        """Flush and finalise the metadata. Returns it.

        end: why the episode ended (END_*). If recording, not the game, ended it (budget,
        interrupt, controller), the last frame is marked ``truncated`` as Gymnasium would.
        """
        if self._closed:
            return self.meta
        p = self._pending
        game_ended = bool(p["actions"]) and (p["terminated"][-1] or p["truncated"][-1])
        if end not in (END_TERMINATED, END_TRUNCATED) and p["actions"] and not game_ended:
            p["truncated"][-1] = True
        self.flush()
        self._closed = True
        self.meta.update(
            closed=True,
            end=end,
            frames=self.frames_written,
            chunks=self.chunks_written,
            total_reward=self.total_reward,
            closed_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        write_json(self.dir / META_FILE, self.meta)
        return self.meta

    def __enter__(self) -> EpisodeWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # An exception mid-episode (including KeyboardInterrupt) still lands what was recorded.
        self.close(END_INTERRUPTED if exc_type is not None else END_TERMINATED)


def _empty_pending() -> dict[str, list]:
    keys = (
        "frames",
        "actions",
        "rewards",
        "terminated",
        "truncated",
        "controller",
        "timestamps",
        "positions",
    )
    return {k: [] for k in keys}
