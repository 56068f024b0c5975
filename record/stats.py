"""Dataset statistics: what a recorded dataset holds, computed without decoding frames.

Every chunk is still read in full (so the zip checksums cover every byte) and any file that
fails is listed in ``bad_chunks``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from episodes.reader import Dataset

POSITION_CELL = 64.0  # map units per coverage cell (64 = a Doom floor tile)


def compute_stats(root: Path | str) -> dict[str, Any]:
    """Summary of a dataset directory as a JSON-able dict.

    Keys: episodes, frames, actions (histogram by name), null_actions, rewards, terminated,
    truncated, ends (how episodes ended), controllers (steps per controller), games, fps,
    frame_shapes, codecs, bytes, bytes_per_frame, seconds (wall clock), coverage (if positions
    were recorded), open_episodes (never closed: killed or still recording), bad_chunks,
    lost_in_flight (temporary files a killed writer left behind).
    """
    dataset = Dataset(Path(root))
    episode_dirs = dataset.episode_dirs
    actions: Counter[str] = Counter()
    controllers: Counter[str] = Counter()
    ends: Counter[str] = Counter()
    games: Counter[str] = Counter()
    frame_shapes: Counter[str] = Counter()
    codecs: Counter[str] = Counter()
    fps: set[float] = set()
    returns: list[float] = []
    lengths: list[int] = []
    positions: list[np.ndarray] = []
    frames = null_actions = terminated = truncated = nonzero_rewards = open_episodes = 0
    reward_sum, seconds = 0.0, 0.0
    for episode_dir in episode_dirs:
        meta = dataset.meta(episode_dir)
        pieces = dataset.read(episode_dir, frames=False)
        names = meta.get("action_names", [])
        games[str(meta.get("game", "?"))] += 1
        ends[str(meta.get("end", "open"))] += 1
        open_episodes += not meta.get("closed", False)
        frame_shapes["x".join(map(str, meta.get("frame_shape", ["?"])))] += 1
        codecs[str(meta.get("codec", "?"))] += 1
        if "fps" in meta:
            fps.add(float(meta["fps"]))
        episode_return, episode_len = 0.0, 0
        for piece in pieces:
            ids, counts = np.unique(piece.actions, return_counts=True)
            for a, c in zip(ids.tolist(), counts.tolist()):
                if a < 0:
                    null_actions += c
                else:
                    actions[names[a] if a < len(names) else str(a)] += c
            controllers.update(piece.controller.tolist())
            terminated += int(piece.terminated.sum())
            truncated += int(piece.truncated.sum())
            nonzero_rewards += int(np.count_nonzero(piece.rewards))
            episode_return += float(piece.rewards.sum())
            episode_len += len(piece)
            if len(piece) > 1:
                seconds += float(piece.timestamps[-1] - piece.timestamps[0])
            if piece.positions is not None:
                positions.append(piece.positions[~np.isnan(piece.positions).any(axis=1)])
        frames += episode_len
        reward_sum += episode_return
        if pieces:
            returns.append(episode_return)
            lengths.append(episode_len)
    size = sum(f.stat().st_size for d in episode_dirs for f in d.iterdir() if f.is_file())
    stats: dict[str, Any] = {
        "root": str(dataset.root),
        "episodes": len(episode_dirs),
        "frames": frames,
        "actions": dict(sorted(actions.items(), key=lambda kv: -kv[1])),
        "null_actions": null_actions,
        "rewards": {
            "sum": round(reward_sum, 4),
            "nonzero_steps": nonzero_rewards,
            "episode_return_mean": round(float(np.mean(returns)), 4) if returns else None,
            "episode_return_min": round(float(np.min(returns)), 4) if returns else None,
            "episode_return_max": round(float(np.max(returns)), 4) if returns else None,
        },
        "episode_length": {
            "mean": round(float(np.mean(lengths)), 1) if lengths else None,
            "min": int(np.min(lengths)) if lengths else None,
            "max": int(np.max(lengths)) if lengths else None,
        },
        "terminated": terminated,
        "truncated": truncated,
        "ends": dict(ends),
        "controllers": dict(controllers),
        "games": dict(games),
        "fps": sorted(fps),
        "frame_shapes": dict(frame_shapes),
        "codecs": dict(codecs),
        "bytes": size,
        "bytes_per_frame": round(size / frames, 1) if frames else None,
        "seconds": round(seconds, 1),
        "open_episodes": open_episodes,
        "bad_chunks": [p.path for p in dataset.problems],
        "problems": [{"path": p.path, "reason": p.reason} for p in dataset.problems],
        "lost_in_flight": [str(p) for p in dataset.temp_files],
    }
    if positions:
        stats["coverage"] = _coverage(np.concatenate(positions))
    return stats


def _coverage(positions: np.ndarray) -> dict[str, Any]:
    """How much of a map the recorded positions (N, 2) visit."""
    cells = np.unique(np.floor(positions / POSITION_CELL).astype(np.int64), axis=0)
    return {
        "cell_size": POSITION_CELL,
        "cells_visited": len(cells),
        "position_std": [round(float(s), 1) for s in positions.std(axis=0)],
    }


def format_stats(stats: dict[str, Any]) -> str:
    """A short human-readable report."""
    lines = [
        (
            f"{stats['root']}: {stats['episodes']} episodes, {stats['frames']} frames "
            f"({stats['open_episodes']} not closed), {stats['bytes'] / 1e6:.1f} MB "
            f"({stats['bytes_per_frame'] or 0:.0f} B/frame)"
        ),
        f"games {stats['games']}  fps {stats['fps']}  frames {stats['frame_shapes']}  "
        f"codecs {stats['codecs']}",
        f"controllers {stats['controllers']}",
        f"ends {stats['ends']}  terminated {stats['terminated']}  truncated {stats['truncated']}",
        f"episode length {stats['episode_length']}",
        f"rewards {stats['rewards']}",
        "actions "
        + ", ".join(
            f"{k} {v} ({v / max(1, sum(stats['actions'].values())):.0%})" for k, v in stats["actions"].items()
        ),
    ]
    if "coverage" in stats:
        lines.append(f"coverage {stats['coverage']}")
    if stats["lost_in_flight"]:
        lines.append(f"lost in flight (killed writers): {len(stats['lost_in_flight'])} temporary file(s)")
    for problem in stats["problems"]:
        lines.append(f"UNREADABLE {problem['path']}: {problem['reason']}")
    return "\n".join(lines)
