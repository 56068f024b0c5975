"""Game-behaviour checks: does the world play like its game, counted in game events.

Fidelity over a few frames cannot see what a player sees first: a Breakout world whose ball fades
away scores well on PSNR, because its screen is mostly static. These checks count events on long
rollouts and on real episodes of the same game, read from the pixels by the game's screen reader,
and compare the two:

- ``ball_share``: frames that show the ball as one ball (one compact blob in the field; not a
  double dot, not a smear, not nothing);
- ``vanish_per_flight``: flights (runs of frames with a ball, gaps of up to two frames bridged) that end with the ball disappearing
  mid-field, not at the field's edge where a real ball leaves it (into the bricks, or past the
  paddle);
- ``brick_breaks_per_1000``: bricks that were there for two frames and are gone for the next
  four (so a flickering brick is not a break), and ``bricks_restored_per_1000``, the reverse
  (a brick reappearing: real only when a new wall is dealt); the bar is on their difference,
  ``bricks_kept_broken_per_1000``, since a world whose bricks blink off and back on scores breaks
  without ever clearing a brick;
- ``reward_events_per_1000``: rewarded transitions: the recorded rewards for real play; the world's
  reward heads on its own frames (re-encoded) for the world.

The world is played closed-loop by the controller that recorded its data (the dataset's
``controller`` and ``controller_config``), reading the world's frames as it read the game's, so the
two sides have the same player. A controller that cannot read frames (random) plays its own
random actions. Only games with a reader here are checked (Breakout, today).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from envs.breakout import BreakoutScreen
from record.controllers import Controller, RandomController
from record.tracker import BallTracker
from worldmodel.reward import REWARD_VALUES

EDGE_MARGIN = 4.0        # pixels (at 64x64; scaled with the frame): a flight ending this near the field's top or
                         # bottom may have left for real; the ball moves up to ~3 px a frame at 64x64
FLIGHT_GAP = 2           # frames without a ball that do not end a flight
BRICK_BEFORE, BRICK_AFTER = 2, 4  # frames a brick must be there before and gone after to count as broken
BARS = {"ball_share_ratio": 0.8, "brick_rate_ratio": 0.5, "vanish_per_flight": 0.1}


def breakout_events(frames: np.ndarray) -> dict:
    """Counts over one sequence (T, H, W, 3) uint8 (see the module docstring)."""
    t = len(frames)
    screen = BreakoutScreen(frames.shape[1:3])
    margin = EDGE_MARGIN * frames.shape[1] / 64
    readings = [screen.read_ball(f) for f in frames]
    seen = [i for i, r in enumerate(readings) if r.ball is not None]
    # flights: runs of frames with a ball, bridging gaps of up to FLIGHT_GAP frames (a ball drawn
    # over a wall or a brick for a frame is still the same flight)
    ends = [a for a, b in zip(seen, seen[1:]) if b - a > FLIGHT_GAP + 1] + seen[-1:]
    flights, vanished = len(ends), 0
    for end in ends:
        row, col = readings[end].ball
        if end + FLIGHT_GAP + 1 < t and not screen.field_edge(row, col, margin):
            vanished += 1  # gone mid-field (into nothing, a double dot or a smear)
    bricks = screen.bricks(frames)  # (T, 6, 18)
    breaks = restored = 0
    for i in range(BRICK_BEFORE, t - BRICK_AFTER + 1):
        before = bricks[i - BRICK_BEFORE:i].all(0)
        after_gone = (~bricks[i:i + BRICK_AFTER]).all(0)
        breaks += int((before & after_gone).sum())
        was_gone = (~bricks[i - BRICK_BEFORE:i]).all(0)
        after_there = bricks[i:i + BRICK_AFTER].all(0)
        restored += int((was_gone & after_there).sum())
    return {"frames": t, "ball_frames": len(seen),
            "broken_ball_frames": sum(r.ball is None and r.blobs > 0 for r in readings),
            "flights": flights, "vanished": vanished, "brick_breaks": breaks, "bricks_restored": restored}


def summarise(counts: list[dict], reward_events: int | None = None) -> dict:
    """Pooled rates over several sequences."""
    total = {k: sum(c[k] for c in counts) for k in counts[0]}
    n = max(total["frames"], 1)
    out = {
        "sequences": len(counts), "frames": total["frames"],
        "ball_share": total["ball_frames"] / n,
        "broken_ball_share": total["broken_ball_frames"] / n,
        "flights": total["flights"],
        "vanish_per_flight": total["vanished"] / total["flights"] if total["flights"] else None,
        "brick_breaks_per_1000": 1000 * total["brick_breaks"] / n,
        "bricks_restored_per_1000": 1000 * total["bricks_restored"] / n,
        "bricks_kept_broken_per_1000": 1000 * max(total["brick_breaks"] - total["bricks_restored"], 0) / n,
    }
    if reward_events is not None:
        out["reward_events_per_1000"] = 1000 * reward_events / n
    return out


def compare(world: dict, real: dict) -> dict:
    """The world's rates against real play, and whether each bar holds."""
    def ratio(key: str) -> float | None:
        return world[key] / real[key] if real[key] else None

    share, bricks = ratio("ball_share"), ratio("bricks_kept_broken_per_1000")
    vanish = world["vanish_per_flight"]
    return {
        "ball_share_ratio": share, "brick_rate_ratio": bricks,
        "passes": {
            "ball_share": share is not None and share >= BARS["ball_share_ratio"],
            "brick_breaks": bricks is not None and bricks >= BARS["brick_rate_ratio"],
            # a world with no flights at all has no ball to lose: that fails ball_share instead
            "vanish": vanish is None or vanish <= BARS["vanish_per_flight"],
        },
    }


GAMES: dict[str, Callable[[np.ndarray], dict]] = {"breakout": breakout_events}


def make_controller(meta: dict, num_actions: int, frame_shape: tuple[int, int], seed: int) -> Controller:
    """The controller that recorded the data, reading frames of the world's size where it reads frames."""
    kind, conf = meta.get("controller"), dict(meta.get("controller_config") or {})
    if kind == "tracker":
        return BallTracker(list(meta["action_names"]), noise=float(conf.get("noise", 0.15)),
                           repeat=tuple(conf.get("repeat", (2, 6))), aim=float(conf.get("aim", 6.0)),
                           seed=seed, screen=BreakoutScreen(frame_shape))
    repeat = tuple(conf.get("repeat", (1, 5)))
    return RandomController(num_actions, repeat=repeat, seed=seed)


def closed_loop(ro, context: np.ndarray, context_actions: np.ndarray, controllers: list[Controller],
                frames: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Roll the engine ``frames`` steps with each controller choosing from what its world shows.
    Returns frames (B, T, H, W, 3), actions (B, T) and latents (B, T, ...) of the generated frames."""
    eng = ro.engine(len(context))
    eng.reset(context, context_actions, seed=seed)
    eng.flush()
    shown = context[:, -1]
    for ctrl, frame in zip(controllers, shown):
        ctrl.reset(frame)
    out, acts, lats = [], [], []
    for _ in range(frames):
        a = np.array([c.act(f) for c, f in zip(controllers, shown)], dtype=np.int64)
        shown = eng.step(a)
        eng.flush()
        out.append(shown)
        acts.append(a)
        lats.append(eng.latents.float().cpu())
    return np.stack(out, 1), np.stack(acts, 1), torch.stack(lats, 1).numpy()


def reward_events(world, latents: np.ndarray, actions: np.ndarray) -> int | None:
    """Transitions the world's reward heads call rewarded (positive class), or None without heads."""
    if world.reward is None:
        return None
    heads = world.reward.float().cpu()
    total = 0
    with torch.no_grad():
        for lat, act in zip(latents, actions):
            x = torch.from_numpy(lat).float()
            r, _ = heads(x[:-1], x[1:], torch.from_numpy(act[1:]))
            total += int((r.argmax(-1) == REWARD_VALUES.index(1.0)).sum())
    return total


def through_tokenizer(tokenizer, frames: np.ndarray, batch: int = 256) -> np.ndarray:
    """Frames (T, H, W, 3) encoded and decoded by ``tokenizer``: what a perfect latent model shows."""
    dev = next(tokenizer.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(frames), batch):
            x = torch.from_numpy(np.ascontiguousarray(frames[i:i + batch])).to(dev)
            out.append(tokenizer.decode(tokenizer.encode(x)).cpu().numpy())
    return np.concatenate(out)


def game_check(world, ro, pieces, contexts: tuple[np.ndarray, np.ndarray], frames: int, seed: int) -> dict | None:
    """The game-behaviour check of one world (None for a game with no reader, or a world that cannot
    be played closed-loop): real held-out episodes against closed-loop rollouts from ``contexts``,
    and the same episodes through the world's tokenizer (the ceiling: a ball the tokenizer cannot
    draw, no world over it can show)."""
    meta = pieces[0].meta if pieces else {}
    events = GAMES.get(meta.get("game"))
    if events is None or not hasattr(ro, "engine"):
        return None
    real_rewards = sum(int((ep.rewards[1:] > 0).sum()) for ep in pieces)
    real = summarise([events(ep.frames) for ep in pieces], real_rewards)
    ceiling = summarise([events(through_tokenizer(world.tokenizer, ep.frames)) for ep in pieces])
    ctx_frames, ctx_actions = contexts
    ctrls = [make_controller(meta, len(world.action_names), ctx_frames.shape[2:4], seed + i)
             for i in range(len(ctx_frames))]
    gen, acts, lats = closed_loop(ro, ctx_frames, ctx_actions, ctrls, frames, seed)
    made = summarise([events(g) for g in gen], reward_events(world, lats, acts))
    return {"game": meta["game"], "controller": meta.get("controller"), "rollout_frames": frames,
            "real": real, "tokenizer": ceiling, "world": made, **compare(made, real), "frames": gen}
