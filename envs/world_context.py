"""Where a world-model episode starts: real frames, an image, or noise.

A reset seeds the engine's KV cache with a short clip of real frames (and the actions between
them) so the dream starts inside the game rather than from a blur. The clip comes from:

- ``"real"``   the frames the checkpoint carries (``context.frames``), or noise if it has none;
- ``"noise"``  nothing: the engine makes the first frame from noise with its first-frame steps;
- a dataset directory (record/ format): a random window of a random recorded episode;
- an image file (.png/.jpg): that one frame.

Every random choice is drawn from the generator the caller passes (the env's ``np_random``), so
Gymnasium's seeding contract holds: the same seed picks the same clips.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np

from episodes.reader import Dataset, DatasetError, Episode

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
CACHED_EPISODES = 8  # decoded dataset episodes kept in memory (a 64x64 episode of 2k frames is 24 MB)

Clip = tuple[np.ndarray, np.ndarray]  # frames uint8 (T, H, W, 3), actions int64 (T,)


class ContextSource:
    """Picks context clips of at most ``length`` frames at the model's ``frame_shape``.

    spec:         "real", "noise", a dataset directory or an image file (see the module docstring).
    frames, actions: the checkpoint's real frames (N, H, W, 3) and actions (N,), or None.
    action_names: the world's actions; a dataset recorded with other actions is refused.
    """

    def __init__(self, spec: str | Path | None, frames: np.ndarray | None, actions: np.ndarray | None,
                 action_names: list[str], frame_shape: tuple[int, int, int], length: int) -> None:
        self.length = max(1, int(length))
        self.size = frame_shape[:2]
        self.action_names = list(action_names)
        self._episodes: OrderedDict[Path, list[Episode]] = OrderedDict()
        spec = "real" if spec is None else spec
        self.spec = str(spec)  # as given, so a recording can name it
        self._segments: list[Clip] = []
        self._dataset: Dataset | None = None
        self._image: np.ndarray | None = None
        if spec == "noise":
            self.kind = "noise"
        elif spec == "real":
            self.kind = "real" if frames is not None and len(frames) else "noise"
            if self.kind == "real":
                self._segments = split_episodes(self._resize(np.asarray(frames)), np.asarray(actions))
        else:
            path = Path(spec)
            if path.is_dir():
                self.kind = "dataset"
                self._dataset = self._open_dataset(path)
            elif path.suffix.lower() in IMAGE_SUFFIXES:
                self.kind = "image"
                self._image = self._read_image(path)
            else:
                raise ValueError(
                    f"context {str(spec)!r} is neither 'real', 'noise', a dataset directory nor an "
                    f"image file ({', '.join(IMAGE_SUFFIXES)}); check the path")

    def describe(self) -> str:
        """A few words for logs and the HUD."""
        return {"noise": "noise", "real": "checkpoint frames", "dataset": f"dataset {self._dataset.root}"
                if self._dataset else "dataset", "image": "image"}[self.kind]

    def sample(self, rng: np.random.Generator, n: int) -> Clip | None:
        """``n`` clips stacked as frames (n, T, H, W, 3) and actions (n, T), or None for noise.

        Clips of one call share T (the engine resets a batch with one context length), so longer
        ones keep their newest T frames.
        """
        if self.kind == "noise":
            return None
        if self.kind == "image":
            frames = np.repeat(self._image[None, None], n, axis=0)
            return frames, np.full((n, 1), -1, np.int64)
        clips = [self._sample_one(rng) for _ in range(n)]
        t = min(len(a) for _, a in clips)
        return (np.stack([f[len(f) - t:] for f, _ in clips]), np.stack([a[len(a) - t:] for _, a in clips]))

    # ---- internals ----------------------------------------------------------------------------
    def _sample_one(self, rng: np.random.Generator) -> Clip:
        if self.kind == "dataset":
            dirs = self._dataset.episode_dirs
            pieces = self._read_episode(dirs[int(rng.integers(len(dirs)))])
            piece = pieces[int(rng.integers(len(pieces)))]
            segments = split_episodes(piece.frames, piece.actions)
        else:
            segments = self._segments
        frames, actions = segments[int(rng.integers(len(segments)))]
        t = min(self.length, len(actions))
        end = int(rng.integers(t, len(actions) + 1))  # a uniformly chosen window of t frames
        return frames[end - t:end], actions[end - t:end]

    def _resize(self, frames: np.ndarray) -> np.ndarray:
        if frames.shape[1:3] == tuple(self.size):
            return frames
        h, w = self.size
        return np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in frames])

    def _read_image(self, path: Path) -> np.ndarray:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR) if path.is_file() else None
        if img is None:
            raise ValueError(f"cannot read the context image {path}: give an existing PNG/JPEG file")
        return self._resize(cv2.cvtColor(img, cv2.COLOR_BGR2RGB)[None])[0]

    def _open_dataset(self, path: Path) -> Dataset:
        try:
            dataset = Dataset(path)
        except DatasetError as err:
            raise ValueError(str(err)) from err
        dirs = dataset.episode_dirs
        if not dirs:
            raise ValueError(f"context dataset {path} holds no recorded episodes; record some first "
                             "or use context='real' / 'noise'")
        names = dataset.meta(dirs[0]).get("action_names")
        if names is not None and list(names) != self.action_names:
            raise ValueError(f"context dataset {path} was recorded with actions {list(names)} but this "
                             f"world's actions are {self.action_names}: use a dataset of the same game")
        return dataset

    def _read_episode(self, episode_dir: Path) -> list[Episode]:
        if episode_dir in self._episodes:
            self._episodes.move_to_end(episode_dir)
            return self._episodes[episode_dir]
        pieces = [p for p in self._dataset.read(episode_dir, frames=True, size=self.size) if len(p)]
        if not pieces:
            raise ValueError(f"episode {episode_dir} has no readable frames: "
                             f"{[p.reason for p in self._dataset.problems][-3:]}")
        self._episodes[episode_dir] = pieces
        if len(self._episodes) > CACHED_EPISODES:
            self._episodes.popitem(last=False)
        return pieces


def split_episodes(frames: np.ndarray, actions: np.ndarray | None) -> list[Clip]:
    """Cut a run of frames at episode starts (action -1 after frame 0) so no clip spans two."""
    actions = np.full(len(frames), -1, np.int64) if actions is None else np.asarray(actions, np.int64)
    starts = [0] + [i for i in range(1, len(actions)) if actions[i] < 0] + [len(actions)]
    return [(frames[a:b], actions[a:b]) for a, b in zip(starts[:-1], starts[1:]) if b > a]
