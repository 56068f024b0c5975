"""Play check for first-person worlds: does the view hold up under a player's keys?

Players do not press random keys: they walk forward, turn and strafe in bursts, and that is where
a first-person world collapses (its view melts into one colour within a second). This check plays
seeded player-like plans (``player_plan``) of a thousand frames or more from every reset clip the
world carries and from held-out contexts, and compares what it shows with real frames of the
game (the held-out episodes):

- ``near_uniform_share``: frames whose pixels barely vary (grey-level std below ``UNIFORM_STD``):
  a blank or one-colour screen;
- ``one_colour_share``: frames in which one coarse colour (8 levels per channel) covers at least
  ``ONE_COLOUR_COVER`` of the view: a view washed over by one colour counts even if faint
  texture survives. Colours are read off 4x4-pixel block means, so this (and the histograms
  below) measure what colours the view is made of, not its fine texture, which ``sharpness``
  measures. (The mean share of a frame in its dominant colour, ``dominant_colour_share``, is
  reported too, but it cannot carry a bar: in real MyWayHome frames it is already 0.60, one wall
  filling most of the view, so "within 2x of real" would pass a red screen);
- ``sharpness``: the mean variance of the grey-level Laplacian, and its ratio to the real frames':
  a blur keeps colours but loses this;
- ``colour_distance``: total-variation distance (0 = same, 1 = disjoint) between the coarse colour
  histograms of the generated and the real frames, over the whole rollout and over its last
  quarter (a late drift shows there first);
- ``turn_back_margin_db``: from each context, turn left k frames then right k, against turning left
  2k. In the game the first comes back to the starting view and the second looks elsewhere, so
  PSNR(end, start view) of the first must beat the second's; a world that forgets what it turned
  away from, or ignores the turn keys, gets a margin near 0.

The same numbers are computed on the real frames (for the turn-back test the game itself would be
needed, so it has no real row: the bar is absolute). Bars are those the world must meet to ship
(``BARS``); ``compare`` says which hold.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from record.explorer import REQUIRED  # the first-person action set: forward and both turns
from train.eval.metrics import psnr

UNIFORM_STD = 6.0        # grey-level std (0..255) under which a frame counts as near-uniform
COLOUR_LEVELS = 8        # coarse colour bins per channel (8^3 colours)
COLOUR_BLOCK = 4         # colours are those of BLOCK x BLOCK pixel means (see the module docstring)
ONE_COLOUR_COVER = 0.8   # a frame this much covered by one coarse colour is a one-colour frame
TURN_FRAMES = 8          # k of the turn-back test
# (bursts) action -> (weight, (min, max) frames): mostly walking, turning in bursts, some strafes
BURSTS: dict[str, tuple[float, tuple[int, int]]] = {
    "FORWARD": (0.40, (12, 40)),
    "TURN_LEFT": (0.14, (4, 16)),
    "TURN_RIGHT": (0.14, (4, 16)),
    "FORWARD_TURN_LEFT": (0.08, (6, 20)),
    "FORWARD_TURN_RIGHT": (0.08, (6, 20)),
    "STRAFE_LEFT": (0.06, (4, 12)),
    "STRAFE_RIGHT": (0.06, (4, 12)),
    "BACKWARD": (0.02, (3, 8)),
    "NOOP": (0.02, (3, 8)),
}
BARS = {"uniform_factor": 2.0, "uniform_points": 0.05, "sharpness_ratio": 0.5, "turn_back_db": 1.0}


def applies(action_names: Sequence[str]) -> bool:
    """The check needs a first-person action set: forward and both turns."""
    return all(a in action_names for a in REQUIRED)


def player_plan(action_names: Sequence[str], frames: int, seed: int) -> np.ndarray:
    """(frames,) int64 action ids: seeded bursts of the actions in ``BURSTS`` the game has."""
    names = [a for a in BURSTS if a in action_names]
    weights = np.array([BURSTS[a][0] for a in names])
    rng = np.random.default_rng(seed)
    out: list[int] = []
    while len(out) < frames:
        a = names[rng.choice(len(names), p=weights / weights.sum())]
        lo, hi = BURSTS[a][1]
        out += [action_names.index(a)] * int(rng.integers(lo, hi + 1))
    return np.array(out[:frames], dtype=np.int64)


def turn_back_plans(action_names: Sequence[str], k: int = TURN_FRAMES) -> tuple[np.ndarray, np.ndarray]:
    """(left k, right k) and (left 2k), each (2k,) action ids."""
    left, right = action_names.index("TURN_LEFT"), action_names.index("TURN_RIGHT")
    back = np.array([left] * k + [right] * k, dtype=np.int64)
    away = np.array([left] * (2 * k), dtype=np.int64)
    return back, away


def _grey(frames: np.ndarray) -> np.ndarray:
    return frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def colour_bins(frames: np.ndarray) -> np.ndarray:
    """Coarse colour bin (0 .. COLOUR_LEVELS^3 - 1) of each COLOUR_BLOCK-pixel block mean of
    frames (T, H, W, 3) uint8 -> (T, H / block, W / block) int64."""
    t, h, w, _ = frames.shape
    hb, wb = h // COLOUR_BLOCK, w // COLOUR_BLOCK
    blocks = frames[:, :hb * COLOUR_BLOCK, :wb * COLOUR_BLOCK].reshape(t, hb, COLOUR_BLOCK, wb, COLOUR_BLOCK, 3)
    q = (blocks.mean(axis=(2, 4)).astype(np.int64) * COLOUR_LEVELS) // 256
    return (q[..., 0] * COLOUR_LEVELS + q[..., 1]) * COLOUR_LEVELS + q[..., 2]


def _counts(bins: np.ndarray) -> np.ndarray:
    return np.bincount(bins.ravel(), minlength=COLOUR_LEVELS ** 3).astype(np.float64)


def frame_stats(frames: np.ndarray) -> dict:
    """Per-sequence counts of frames (T, H, W, 3) uint8 (see the module docstring), each read once:
    ``pool`` turns any set of them into rates."""
    grey = _grey(frames)
    std = grey.reshape(len(frames), -1).std(axis=1)
    bins = colour_bins(frames)
    dominant = np.array([np.bincount(b.ravel()).max() / b.size for b in bins])
    lap = [cv2.Laplacian(g, cv2.CV_32F).var() for g in grey]
    return {"frames": len(frames), "near_uniform": int((std < UNIFORM_STD).sum()),
            "one_colour": int((dominant >= ONE_COLOUR_COVER).sum()),
            "dominant_sum": float(dominant.sum()), "sharpness_sum": float(np.sum(lap)),
            "colours": _counts(bins), "late_colours": _counts(bins[len(bins) - max(1, len(bins) // 4):])}


def pool(stats: Sequence[dict]) -> dict:
    """Pooled rates over sequences' ``frame_stats``, with the normalised colour histograms (whole
    sequences and their last quarters) for ``colour_distance``."""
    n = max(sum(s["frames"] for s in stats), 1)
    colours, late = sum(s["colours"] for s in stats), sum(s["late_colours"] for s in stats)
    return {"sequences": len(stats), "frames": n,
            "near_uniform_share": sum(s["near_uniform"] for s in stats) / n,
            "one_colour_share": sum(s["one_colour"] for s in stats) / n,
            "dominant_colour_share": sum(s["dominant_sum"] for s in stats) / n,
            "sharpness": sum(s["sharpness_sum"] for s in stats) / n,
            "histogram": colours / max(colours.sum(), 1.0), "late_histogram": late / max(late.sum(), 1.0)}


def summarise(sequences: Sequence[np.ndarray]) -> dict:
    """``pool`` of the ``frame_stats`` of sequences of frames."""
    return pool([frame_stats(s) for s in sequences])


def colour_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Total-variation distance between two normalised histograms (0 = same, 1 = disjoint)."""
    return float(0.5 * np.abs(a - b).sum())


def turn_back_margin(start: np.ndarray, back_end: np.ndarray, away_end: np.ndarray) -> np.ndarray:
    """dB by which ``back_end`` is nearer ``start`` than ``away_end`` is, per context (B,).
    PSNR is capped at 60 dB so an exact return does not read as infinite."""
    return np.minimum(psnr(back_end, start), 60.0) - np.minimum(psnr(away_end, start), 60.0)


def compare(world: dict, real: dict, margin_db: float | None) -> dict:
    """The world's numbers against the real frames', and whether each bar holds."""
    def within(key: str) -> bool:   # within max(2x, +5 points) of the real share
        limit = max(BARS["uniform_factor"] * real[key], real[key] + BARS["uniform_points"])
        return world[key] <= limit

    ratio = world["sharpness"] / real["sharpness"] if real["sharpness"] else None
    return {
        "sharpness_ratio": ratio,
        "colour_distance": colour_distance(world["histogram"], real["histogram"]),
        "late_colour_distance": colour_distance(world["late_histogram"], real["histogram"]),
        "passes": {
            "near_uniform": within("near_uniform_share"),
            "one_colour": within("one_colour_share"),
            "sharpness": ratio is not None and ratio >= BARS["sharpness_ratio"],
            "turn_back": margin_db is not None and margin_db > BARS["turn_back_db"],
        },
    }


def play_check(world, ro, pieces, contexts: tuple[np.ndarray, np.ndarray], frames: int, seed: int,
               k: int = TURN_FRAMES) -> dict | None:
    """The play check of one world (None where it does not apply): ``frames``-frame player plans
    from every context (held-out ones and the world's reset clips), against the held-out episodes'
    real frames, and the turn-back test from the same contexts."""
    names = list(world.action_names)
    if not applies(names) or not pieces:
        return None
    ctx_frames, ctx_actions = contexts
    b = len(ctx_frames)
    plans = np.stack([player_plan(names, frames, seed + i) for i in range(b)])
    gen = ro.run(ctx_frames, ctx_actions, plans, seed)
    back, away = turn_back_plans(names, k)
    turns = ro.run(np.concatenate([ctx_frames, ctx_frames]), np.concatenate([ctx_actions, ctx_actions]),
                   np.concatenate([np.tile(back, (b, 1)), np.tile(away, (b, 1))]), seed)
    margins = turn_back_margin(ctx_frames[:, -1], turns[:b, -1], turns[b:, -1])
    real = summarise([ep.frames for ep in pieces])
    stats = [frame_stats(g) for g in gen]  # each rollout read once, pooled two ways
    made, per_context = pool(stats), [pool([s]) for s in stats]
    margin = float(np.mean(margins))
    return {"rollout_frames": frames, "contexts": b, "turn_frames": k,
            "real": {k_: v for k_, v in real.items() if "histogram" not in k_},
            "world": {k_: v for k_, v in made.items() if "histogram" not in k_},
            "per_context": [{"near_uniform_share": p["near_uniform_share"], "one_colour_share": p["one_colour_share"],
                             "sharpness_ratio": p["sharpness"] / real["sharpness"] if real["sharpness"] else None,
                             "turn_back_margin_db": float(m)} for p, m in zip(per_context, margins)],
            "turn_back_margin_db": margin, **compare(made, real, margin), "frames": gen}
