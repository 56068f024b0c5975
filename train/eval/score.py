"""Scoring one world checkpoint on the held-out clips: fidelity vs horizon with its trivial
baselines, controllability, drift, speed, and the reward heads when the world has them.

Fidelity at horizon h compares generated frame h (after the real context) with real frame
``anchor + h``, on uint8 frames at model resolution. Beside the model, on the same frames:
``repeat_last`` (the last context frame again), ``mean_frame`` (the training data's mean frame)
and ``tokenizer`` (the real frame through encode/decode: the ceiling any latent model has).
``psnr_dynamic`` restricts PSNR to pixels where the real frame differs from the last context
frame. Δ-PSNR = PSNR(recorded actions) - PSNR(the same future actions shuffled in time), with
the same context and noise seed. A time shuffle keeps the multiset of actions, and where actions
commute (turning left 5 times and right twice ends at the same heading in any order) it keeps the
end state too, so at long horizons it can read ~0 for a world that does follow its actions.
Δ-PSNR(other) = PSNR(recorded) - PSNR(another held-out clip's future actions), same context and
noise: a counterfactual with the data's action statistics but none of this clip's.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from envs.world_context import split_episodes
from episodes.reader import Episode
from train.eval import metrics as M
from train.eval.probe import accuracy, sequence_pairs
from train.eval.reference import UNIFORM_LEVEL, Reference, is_duplicate
from train.eval.rollout import EngineRollout, JointRollout
from train.eval.split import Clips
from worldmodel.checkpoint import World

DRIFT_RANGE_MARGIN = 0.1      # real [p0.5, p99.5] range widened by this fraction on each side
DRIFT_OUT_OF_RANGE = 0.1      # flag when more than this fraction of frames leave the range
FLAT_STD = 1.0                # levels: a frame whose pixels vary less than this is flat, whatever the data
FLAT_FRACTION = 0.2           # ... or less than this fraction of the least contrasted real frames (p0.5)
UNIFORM_EXCESS = 0.1          # near-uniform frames: flag above max(2x, +this) the real data's share


@dataclass
class Scored:
    metrics: dict
    generated: np.ndarray      # (N, H_max, H, W, 3) frames under the recorded actions
    drift_frames: np.ndarray   # (T, H, W, 3) the first drift rollout (the timed one)
    drift_actions: np.ndarray  # (T,)


def _batched(ro, clips: Clips, actions: np.ndarray, batch: int, seed: int) -> np.ndarray:
    c = ro.context
    out = []
    for i in range(0, len(clips), batch):
        s = slice(i, i + batch)
        out.append(ro.run(clips.context_frames(c)[s], clips.context_actions(c)[s], actions[s], seed=seed + i))
    return np.concatenate(out)


def shuffle_in_time(actions: np.ndarray, seed: int) -> np.ndarray:
    """Each row's actions in a random order (same multiset: only the timing is lost)."""
    rng = np.random.default_rng(seed)
    return np.stack([row[rng.permutation(len(row))] for row in actions])


def other_clips(actions: np.ndarray, seed: int) -> np.ndarray:
    """Each row gets another row's actions (a random cyclic derangement of the rows)."""
    n = len(actions)
    if n < 2:
        raise ValueError("the other-clip counterfactual needs at least 2 held-out clips")
    perm = np.random.default_rng(seed).permutation(n)
    out = np.empty_like(actions)
    out[perm] = actions[np.roll(perm, -1)]
    return out


def _scores(pred: np.ndarray, real: np.ndarray, mask: np.ndarray) -> dict:
    return {"psnr": M.mean_db(M.psnr(pred, real)), "ssim": M.nanmean(M.ssim(pred, real)),
            "psnr_dynamic": M.mean_db(M.masked_psnr(pred, real, mask))}


def fidelity(clips: Clips, generated: np.ndarray, shuffled: np.ndarray, ref: Reference, horizons: list[int],
             recon: Callable[[np.ndarray], np.ndarray] | None = None,
             other: np.ndarray | None = None) -> tuple[dict, dict, dict]:
    """Per-horizon scores of the model and baselines, the Δ-PSNR per horizon against the time
    shuffle, and against `other` (frames made under other clips' actions) when given."""
    out, delta, delta_other = {}, {}, {}
    last = clips.last_context
    for h in horizons:
        real = clips.future_frames[:, h - 1]
        mask = M.dynamic_mask(real, last)
        row = _scores(generated[:, h - 1], real, mask)
        row["repeat_last"] = _scores(last, real, mask)
        row["mean_frame"] = _scores(np.broadcast_to(ref.mean_frame, real.shape), real, mask)
        if recon is not None:
            row["tokenizer"] = _scores(recon(real), real, mask)
        row["dynamic_fraction"] = float(mask.mean())
        shuf = M.mean_db(M.psnr(shuffled[:, h - 1], real))
        row["psnr_shuffled"] = shuf
        delta[str(h)] = row["psnr"] - shuf
        if other is not None:
            row["psnr_other"] = M.mean_db(M.psnr(other[:, h - 1], real))
            delta_other[str(h)] = row["psnr"] - row["psnr_other"]
        out[str(h)] = row
    return out, delta, delta_other


def random_actions(n: int, num_actions: int, seed: int, hold: tuple[int, int] = (1, 5)) -> np.ndarray:
    """Uniform random actions, each held for 1-5 frames (as a random recording controller does)."""
    rng = np.random.default_rng(seed)
    acts = np.repeat(rng.integers(0, num_actions, n), rng.integers(hold[0], hold[1] + 1, n))[:n]
    return acts.astype(np.int64)


def drift(frames: np.ndarray, ref: Reference) -> dict:
    """Frame statistics of long rollouts against the real data's range: ``frames`` is one rollout
    (T, H, W, 3) or several from different contexts (N, T, H, W, 3), pooled (a collapse often
    depends on what the context faces, so one rollout can miss it). Flags:
    out_of_range: more than 10% of the frames have a pixel mean or spatial std outside the real
        frames' [p0.5, p99.5] range widened by 10% (+1 level);
    frozen: in the second half, consecutive near-duplicates (no pixel moved more than 24 levels)
        are more frequent than max(2x, +0.2) the real data's rate (games have static stretches);
    flat: the median spatial std of some rollout's last 10% of frames is below max(1 level,
        0.2 x the real p0.5 std): the picture collapsed to (nearly) one grey level;
    uniform: near-uniform frames (each colour channel varies by less than UNIFORM_LEVEL, so one
        colour, saturated or not, anywhere in the rollouts) are more frequent than max(2x, +0.1)
        the real data's share: a world that walks into a wall and stays a red screen."""
    rollouts = frames[None] if frames.ndim == 4 else frames
    n, t = rollouts.shape[:2]
    # one rollout at a time: the statistics work in float64, 8x the frames' bytes
    stats = [M.frame_stats(r) for r in rollouts]
    m, s = np.stack([a for a, _ in stats]), np.stack([b for _, b in stats])
    (mlo, mhi), (slo, shi) = ref.mean_range, ref.std_range
    dm, ds = DRIFT_RANGE_MARGIN * (mhi - mlo) + 1.0, DRIFT_RANGE_MARGIN * (shi - slo) + 1.0
    outside = (m < mlo - dm) | (m > mhi + dm) | (s < slo - ds) | (s > shi + ds)
    dup = (np.stack([is_duplicate(r[1:], r[:-1]) for r in rollouts]) if t > 1
           else np.zeros((n, 0), bool))
    tail = dup[:, dup.shape[1] // 2:]
    tail_dup = float(tail.mean()) if tail.size else 0.0
    last = max(1, t // 10)
    final_std = float(np.median(s[:, -last:], axis=1).min())
    real_dup = ref.duplicate_fraction
    uniform_each = np.array([(M.colour_spread(r) < UNIFORM_LEVEL).mean() for r in rollouts])
    uniform = float(uniform_each.mean())
    real_uniform = ref.uniform_fraction
    return {
        "frames": int(t),
        "rollouts": int(n),
        "mean": {"first": float(m[:, :last].mean()), "last": float(m[:, -last:].mean()),
                 "min": float(m.min()), "max": float(m.max()), "real_range": [mlo, mhi]},
        "std": {"first": float(s[:, :last].mean()), "last": float(s[:, -last:].mean()), "min": float(s.min()),
                "max": float(s.max()), "real_range": [slo, shi]},
        "out_of_range_fraction": float(outside.mean()),
        "duplicate_fraction": float(dup.mean()) if dup.size else 0.0,
        "duplicate_fraction_second_half": tail_dup,
        "real_duplicate_fraction": real_dup,
        "uniform_fraction": uniform,
        "uniform_fraction_per_rollout": [float(u) for u in uniform_each],
        "real_uniform_fraction": real_uniform,
        "flags": {
            "out_of_range": bool(outside.mean() > DRIFT_OUT_OF_RANGE),
            "frozen": bool(tail_dup > max(2 * real_dup, real_dup + 0.2)),
            "flat": bool(final_std < max(FLAT_STD, FLAT_FRACTION * slo)),
            "uniform": bool(uniform > max(2 * real_uniform, real_uniform + UNIFORM_EXCESS)),
        },
    }


def drift_contexts(n_clips: int, n: int) -> np.ndarray:
    """Indices of ``n`` held-out clips spread over the set (clip 0 first: the one whose rollout is
    timed and saved as a video)."""
    n = max(1, min(n, n_clips))
    return np.unique(np.linspace(0, n_clips - 1, n).round().astype(int))


def speed(ro, frame_seconds: list[float]) -> dict:
    """First-frame latency and steady-state per-frame time. The drift rollout starts with a full
    cache (real context), so every frame is steady state; the first tenth is dropped as warm-up."""
    ms = [1e3 * t for t in frame_seconds]
    steady = ms[len(ms) // 10:] if len(ms) >= 10 else ms
    block = getattr(ro, "block", 1)
    if isinstance(ro, JointRollout) or block > 1:
        # chunk-wise and joint windows pay a block's cost on one frame: average whole blocks
        frame_ms = statistics.fmean(steady) if steady else float("nan")
    else:
        frame_ms = statistics.median(steady) if steady else float("nan")
    first = ro.first_frame_ms()
    return {"first_frame_ms": first, "frame_ms": frame_ms, "fps": 1e3 / frame_ms if frame_ms > 0 else None}


def reward_scores(world: World, pieces: list[Episode], device: torch.device) -> dict | None:
    """The world's reward heads on every transition of the held-out episodes."""
    if world.reward is None:
        return None
    from train.objectives.rewards import classification_metrics, sign_classes

    tok, heads = world.tokenizer.to(device).float(), world.reward.to(device).float()
    logits, ends, labels, done = [], [], [], []
    for ep in pieces:
        if len(ep) < 2:
            continue
        with torch.no_grad():
            lat = torch.cat([tok.encode(torch.from_numpy(ep.frames[i:i + 256]).to(device))
                             for i in range(0, len(ep), 256)]).float()
            r, e = heads(lat[:-1], lat[1:], torch.from_numpy(ep.actions[1:]).to(device))
        logits.append(r.cpu())
        ends.append(e.cpu())
        labels.append(sign_classes(torch.from_numpy(ep.rewards[1:])))
        done.append(torch.from_numpy(ep.terminated[1:]))
    if not logits:
        return None
    return classification_metrics(torch.cat(logits), torch.cat(ends), torch.cat(labels), torch.cat(done))


def world_contexts(world: World, length: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The newest ``length`` frames (and actions) of each real context clip the world carries, the
    clips its env's resets start from; None when it carries none as long."""
    if world.context_frames is None or not len(world.context_frames):
        return None
    clips = [(f[-length:], a[-length:]) for f, a in split_episodes(world.context_frames.numpy(),
                                                                  world.context_actions.numpy())
             if len(a) >= length]
    if not clips:
        return None
    return np.stack([f for f, _ in clips]), np.stack([a for _, a in clips])


def score(world: World, ro: EngineRollout | JointRollout, clips: Clips, ref: Reference, horizons: list[int],
          rollout: int, seed: int, batch: int, pieces: list[Episode], device: torch.device,
          contexts: int = 1, world_clips: bool = False) -> Scored:
    """Every metric of one checkpoint; see the module docstring."""
    fut = clips.future_actions
    generated = _batched(ro, clips, fut, batch, seed)
    shuffled = _batched(ro, clips, shuffle_in_time(fut, seed), batch, seed)
    other = _batched(ro, clips, other_clips(fut, seed), batch, seed) if len(clips) > 1 else None

    tok = world.tokenizer

    def recon(frames: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(next(tok.parameters()).device)
        with torch.no_grad():
            return tok.decode(tok.encode(x)).cpu().numpy()

    fid, delta, delta_other = fidelity(clips, generated, shuffled, ref, horizons, recon, other)

    names = world.action_names
    probe: dict = {"num_actions": ref.probe.cfg.num_actions}
    if fut.max() < ref.probe.cfg.num_actions:
        p, c, a = sequence_pairs(clips.last_context, clips.future_frames, fut)
        real_acc = accuracy(ref.probe, p, c, a)
        p, c, a = sequence_pairs(clips.last_context, generated, fut)
        gen_acc = accuracy(ref.probe, p, c, a)
        counts = np.bincount(a[a >= 0], minlength=ref.probe.cfg.num_actions)
        probe.update(real_accuracy=real_acc, generated_accuracy=gen_acc,
                     ratio=gen_acc / real_acc if real_acc > 0 else None,
                     chance=float(counts.max() / max(counts.sum(), 1)))

    # drift: the first context alone (timed, saved as the video), then the others as one batch,
    # each with its own random actions
    frame_seconds: list[float] = []
    c = ro.context
    idx = drift_contexts(len(clips), contexts)
    acts = np.stack([random_actions(rollout, len(names), seed + i) for i in range(len(idx))])
    ctx_frames, ctx_actions = clips.context_frames(c)[idx], clips.context_actions(c)[idx]
    drift_frames = ro.run(ctx_frames[:1], ctx_actions[:1], acts[:1], seed=seed,
                          on_frame=lambda t, sec: frame_seconds.append(sec))
    timing = speed(ro, frame_seconds)  # before another run replaces the joint protocol's timings
    parts = [drift_frames]
    if len(idx) > 1:
        parts.append(ro.run(ctx_frames[1:], ctx_actions[1:], acts[1:], seed=seed + 1))
    labels = [f"held_out:{i}" for i in idx]
    own = world_contexts(world, c) if world_clips else None
    if own is not None:
        # the clips a reset starts from (what a player sees first): a world can collapse from
        # those and not from held-out ones, or the other way round
        own_acts = np.stack([random_actions(rollout, len(names), seed + len(idx) + i)
                             for i in range(len(own[0]))])
        parts.append(ro.run(*own, own_acts, seed=seed + 2))
        labels += [f"world:{i}" for i in range(len(own[0]))]
    drift_frames = np.concatenate(parts)

    metrics = {
        "protocol": ro.protocol,
        "context_frames": c,
        "samples": len(clips),
        "horizons": list(horizons),
        "fidelity": fid,
        "controllability": {"delta_psnr": delta, "delta_psnr_other": delta_other, "probe": probe},
        "drift": {**drift(drift_frames, ref), "contexts": labels},
        "speed": timing,
        "rewards": reward_scores(world, pieces, device),
    }
    return Scored(metrics, generated, drift_frames[0], acts[0])
