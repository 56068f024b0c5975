"""What evaluation needs from the real data and not from any model, computed once per dataset:
the mean frame (a trivial baseline), the range of real frame statistics (for the drift check),
how often real consecutive frames are near-duplicates, and the inverse-dynamics probe.

All of it is fitted on the TRAINING episodes of the split (`train/eval/split.py`) and cached
next to the dataset, in ``<dataset>/.eval_cache/reference-<key>.safetensors`` (a dot directory:
the dataset reader ignores it). The key hashes the bytes of every episode file, the resolution,
the split and the probe's config, so new or changed recordings get a new reference and the same
data never trains the probe twice. Where the dataset directory is read-only, the cache goes to
the evaluation's output directory instead.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from episodes.reader import Dataset
from train import UsageError
from train.eval.metrics import colour_spread, frame_stats
from train.eval.probe import InverseDynamics, ProbeConfig, train_probe
from train.eval.split import HELD_OUT_FRACTION, read_episodes

VERSION = 2
CACHE_DIR = ".eval_cache"
DUPLICATE_LEVEL = 24  # consecutive frames are near-duplicates if no pixel channel moved more than this
UNIFORM_LEVEL = 5.0   # a frame is near-uniform if its colour channels vary less than this (levels)


@dataclass
class Reference:
    mean_frame: np.ndarray            # uint8 (H, W, 3): mean of the training frames, rounded
    mean_range: tuple[float, float]   # per-frame pixel mean: 0.5th and 99.5th percentile over real frames
    std_range: tuple[float, float]    # per-frame spatial std: same percentiles
    duplicate_fraction: float         # real consecutive pairs that are near-duplicates
    probe: InverseDynamics
    action_names: list[str]
    frames: int                       # training frames the statistics come from
    pairs: int                        # training pairs the probe was fitted on
    key: str
    path: Path
    uniform_fraction: float = 0.0     # real frames that are near-uniform (one colour)


def is_duplicate(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) pairs -> (...,) bool: no pixel channel differs by more than DUPLICATE_LEVEL.
    A max, not a mean: a moving 2x2 ball is 0.1% of a 64x64 frame, lost in any average."""
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return d.max(axis=(-3, -2, -1)) <= DUPLICATE_LEVEL


def dataset_key(dirs: list[Path], resolution: int, probe: ProbeConfig) -> str:
    """sha256 (16 hex digits) of every episode file's bytes plus what the reference depends on."""
    h = hashlib.sha256(json.dumps({"version": VERSION, "resolution": resolution,
                                   "held_out": HELD_OUT_FRACTION, "duplicate": DUPLICATE_LEVEL,
                                   "probe": probe.to_dict()}).encode())
    for d in sorted(dirs):
        for f in sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")):
            h.update(f"{d.name}/{f.name}".encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def _action_names(dataset: Dataset, dirs: list[Path]) -> list[str]:
    for d in dirs:
        names = dataset.meta(d).get("action_names")
        if names:
            return list(names)
    return []


def build_reference(dataset: Dataset, train_dirs: list[Path], resolution: int, probe_cfg: ProbeConfig,
                    device: torch.device | str) -> dict:
    """Stream the training episodes once: statistics, and pairs for the probe."""
    per_episode = math.ceil(probe_cfg.max_pairs / max(len(train_dirs), 1))
    total = np.zeros((resolution, resolution, 3), np.float64)
    means, stds, dups, uniform = [], [], [], []
    prev, cur, acts = [], [], []
    n = 0
    for ep in read_episodes(dataset, train_dirs, resolution):
        f = ep.frames
        total += f.astype(np.float64).sum(axis=0)
        n += len(f)
        m, s = frame_stats(f)
        means.append(m), stds.append(s)
        uniform.append(colour_spread(f) < UNIFORM_LEVEL)
        if len(f) > 1:
            dups.append(is_duplicate(f[1:], f[:-1]))
        valid = np.flatnonzero(ep.actions[1:] >= 0) + 1  # pair (i-1, i) needs a known action i
        if valid.size:
            spread = np.linspace(0, valid.size - 1, min(per_episode, valid.size)).round().astype(int)
            take = valid[np.unique(spread)]
            prev.append(f[take - 1]), cur.append(f[take]), acts.append(ep.actions[take])
    if n == 0 or not acts:
        raise UsageError(f"the training episodes of {dataset.root} hold no readable frames with actions; "
                         "nothing to fit the evaluation probe on")
    means_a, stds_a = np.concatenate(means), np.concatenate(stds)
    P, C, A = np.concatenate(prev), np.concatenate(cur), np.concatenate(acts)
    t0 = time.perf_counter()
    net = train_probe(P, C, A, probe_cfg, device)
    print(f"evaluate: fitted the inverse-dynamics probe on {len(A)} real pairs in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return {
        "mean_frame": np.clip(np.round(total / n), 0, 255).astype(np.uint8),
        "mean_range": [float(np.percentile(means_a, 0.5)), float(np.percentile(means_a, 99.5))],
        "std_range": [float(np.percentile(stds_a, 0.5)), float(np.percentile(stds_a, 99.5))],
        "duplicate_fraction": float(np.concatenate(dups).mean()) if dups else 0.0,
        "uniform_fraction": float(np.concatenate(uniform).mean()),
        "frames": int(n), "pairs": int(len(A)), "probe": net,
    }


def _save(path: Path, ref: dict, probe_cfg: ProbeConfig, names: list[str], key: str) -> None:
    tensors = {f"probe.{k}": v.detach().cpu().contiguous() for k, v in ref["probe"].state_dict().items()}
    tensors["mean_frame"] = torch.from_numpy(ref["mean_frame"])
    meta = {k: ref[k] for k in ("mean_range", "std_range", "duplicate_fraction", "uniform_fraction", "frames",
                                 "pairs")}
    meta.update(probe=probe_cfg.to_dict(), action_names=names, key=key, version=VERSION)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"reference": json.dumps(meta)})
    os.replace(tmp, path)


def _load(path: Path, device: torch.device | str) -> Reference:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["reference"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    net = InverseDynamics(ProbeConfig(**meta["probe"]))
    net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("probe.")})
    return Reference(mean_frame=tensors["mean_frame"].numpy(), mean_range=tuple(meta["mean_range"]),
                     std_range=tuple(meta["std_range"]), duplicate_fraction=meta["duplicate_fraction"],
                     probe=net.to(device).eval(), action_names=list(meta["action_names"]),
                     frames=meta["frames"], pairs=meta["pairs"], key=meta["key"], path=path,
                     uniform_fraction=meta["uniform_fraction"])


def load_reference(dataset: Dataset, train_dirs: list[Path], held_dirs: list[Path], resolution: int,
                   probe_cfg: ProbeConfig, fallback_dir: Path, device: torch.device | str = "cpu",
                   ) -> Reference:
    """The cached reference for this dataset and resolution, built first if needed."""
    key = dataset_key(train_dirs + held_dirs, resolution, probe_cfg)
    name = f"reference-{key}.safetensors"
    for root in (dataset.root / CACHE_DIR, Path(fallback_dir) / CACHE_DIR):
        if (root / name).exists():
            return _load(root / name, device)
    names = _action_names(dataset, train_dirs + held_dirs)
    ref = build_reference(dataset, train_dirs, resolution, probe_cfg, device)
    for root in (dataset.root / CACHE_DIR, Path(fallback_dir) / CACHE_DIR):
        try:
            _save(root / name, ref, probe_cfg, names, key)
            return _load(root / name, device)
        except OSError as e:
            print(f"warning: cannot cache the evaluation reference in {root} ({e})", file=sys.stderr)
    raise UsageError(f"cannot write the evaluation reference anywhere (tried {dataset.root / CACHE_DIR} and "
                     f"{Path(fallback_dir) / CACHE_DIR}); check permissions of out=...")
