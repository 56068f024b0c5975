"""What evaluation writes: metrics.json, the comparison table (Markdown + JSON), PNG plots drawn
with cv2, and mp4 samples (real | generated, action names overlaid)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
           (227, 119, 194), (140, 86, 75), (188, 189, 34)]  # RGB
GREY = (127, 127, 127)


def finite(x):
    """Nested dicts/lists with NaN/inf floats (and numpy scalars) turned into JSON values."""
    if isinstance(x, dict):
        return {str(k): finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite(data), indent=2, allow_nan=False))


# ----- the table ----------------------------------------------------------------------------------


def table_row(name: str, m: dict) -> dict:
    """One checkpoint's row: fidelity with baselines, dynamic PSNR, Δ-PSNR, probe, drift, speed."""
    row: dict = {"name": name, "protocol": m["protocol"], "sampler": m["sampler"], "steps": m["steps"]}
    for h, f in m["fidelity"].items():
        row[f"psnr@{h}"] = f["psnr"]
        row[f"repeat@{h}"] = f["repeat_last"]["psnr"]
        row[f"mean@{h}"] = f["mean_frame"]["psnr"]
        row[f"ssim@{h}"] = f["ssim"]
        row[f"dyn@{h}"] = f["psnr_dynamic"]
        row[f"dyn_repeat@{h}"] = f["repeat_last"]["psnr_dynamic"]
        if "tokenizer" in f:   # the real frames through the world's own tokenizer: the ceiling
            row[f"tok@{h}"] = f["tokenizer"]["psnr"]
            row[f"dyn_tok@{h}"] = f["tokenizer"]["psnr_dynamic"]
        row[f"dpsnr@{h}"] = m["controllability"]["delta_psnr"][h]
        row[f"dpsnr_other@{h}"] = m["controllability"].get("delta_psnr_other", {}).get(h)
    probe = m["controllability"]["probe"]
    row["probe_ratio"] = probe.get("ratio")
    row["probe_acc"] = probe.get("generated_accuracy")
    row["probe_real"] = probe.get("real_accuracy")
    flags = [k for k, v in m["drift"]["flags"].items() if v]
    row["drift"] = ",".join(flags) if flags else "ok"
    row["first_frame_ms"] = m["speed"]["first_frame_ms"]
    row["frame_ms"] = m["speed"]["frame_ms"]
    training = m.get("training") or {}
    row["train_min"] = training["seconds"] / 60 if "seconds" in training else None
    row["train_steps"] = training.get("steps")
    play = m.get("play")
    if play:
        w, r = play["world"], play["real"]
        row.update(play_uniform=w["near_uniform_share"], play_uniform_real=r["near_uniform_share"],
                   play_colour=w["one_colour_share"], play_colour_real=r["one_colour_share"],
                   play_sharpness=play["sharpness_ratio"], play_hist=play["colour_distance"],
                   play_hist_late=play["late_colour_distance"], play_turn_back=play["turn_back_margin_db"],
                   play_failed=failed_bars(play["passes"]))
    game = m.get("game")
    if game:
        w, r = game["world"], game["real"]
        row.update(game_ball=w["ball_share"], game_ball_real=r["ball_share"],
                   game_broken=w["broken_ball_share"], game_vanish=w["vanish_per_flight"],
                   game_vanish_real=r["vanish_per_flight"], game_bricks=w["brick_breaks_per_1000"],
                   game_bricks_real=r["brick_breaks_per_1000"], game_restored=w["bricks_restored_per_1000"],
                   game_kept=w.get("bricks_kept_broken_per_1000"), game_kept_real=r.get("bricks_kept_broken_per_1000"),
                   game_rewards=w.get("reward_events_per_1000"), game_rewards_real=r.get("reward_events_per_1000"),
                   game_failed=failed_bars(game["passes"]))
        if game.get("tokenizer"):
            row.update(game_ball_tok=game["tokenizer"]["ball_share"])
    return row


def game_table(rows: list[dict]) -> str:
    """The game-behaviour check as its own table ("" when no row has one)."""
    rows = [r for r in rows if "game_ball" in r]
    if not rows:
        return ""
    head = ["checkpoint", "ball shown (real / tokenizer)", "double/smeared", "vanish per flight (real)",
            "brick breaks /1000 (real)", "bricks restored /1000",
            "kept broken /1000 (real)", "reward events /1000 (real)", "bars failed"]
    lines = ["\n### Game behaviour\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["name"], f"{_fmt(r['game_ball'], 3)} ({_fmt(r['game_ball_real'], 3)} / {_fmt(r.get('game_ball_tok'), 3)})",
            _fmt(r["game_broken"], 3),
            f"{_fmt(r['game_vanish'], 3)} ({_fmt(r['game_vanish_real'], 3)})",
            f"{_fmt(r['game_bricks'])} ({_fmt(r['game_bricks_real'])})", _fmt(r["game_restored"]),
            f"{_fmt(r.get('game_kept'))} ({_fmt(r.get('game_kept_real'))})",
            f"{_fmt(r['game_rewards'])} ({_fmt(r['game_rewards_real'])})", r["game_failed"]]) + " |")
    lines.append("\nClosed-loop rollouts played by the dataset's own controller reading the world's frames, "
                 "against the held-out episodes (tokenizer: those episodes encoded and decoded, the ceiling); bars: ball shown >= 0.8x real, bricks kept broken (breaks minus restored) >= 0.5x real, "
                 "vanish <= 0.1 per flight (train/eval/game.py).\n")
    return "\n".join(lines)


def failed_bars(passes: dict[str, bool]) -> str:
    """The table cell for a check's bars: the failed ones, or "ok"."""
    return ",".join(k for k, v in passes.items() if not v) or "ok"


def play_table(rows: list[dict]) -> str:
    """The play check as its own table ("" when no row has one)."""
    rows = [r for r in rows if "play_uniform" in r]
    if not rows:
        return ""
    head = ["checkpoint", "near-uniform frames (real)", "one-colour frames (real)", "sharpness / real",
            "colour distance (last quarter)", "turn-back margin dB", "bars failed"]
    lines = ["\n### Play (player-like keys)\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["name"], f"{_fmt(r['play_uniform'], 3)} ({_fmt(r['play_uniform_real'], 3)})",
            f"{_fmt(r['play_colour'], 3)} ({_fmt(r['play_colour_real'], 3)})", _fmt(r["play_sharpness"], 2),
            f"{_fmt(r['play_hist'], 3)} ({_fmt(r['play_hist_late'], 3)})", _fmt(r["play_turn_back"], 2),
            r["play_failed"]]) + " |")
    lines.append("\nSeeded bursts of forward, turns and strafes from held-out contexts and every reset clip, "
                 "against the held-out episodes' frames; bars: near-uniform and one-colour shares within "
                 "max(2x, +5 points) of real, sharpness >= 0.5x real, turn-back margin > 1 dB "
                 "(train/eval/play_check.py).\n")
    return "\n".join(lines)


def _fmt(v, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(rows: list[dict], horizons: list[int]) -> str:
    """PSNR@h as `model (repeat / mean)`, dynamic PSNR@h as `model (repeat)`, in dB."""
    head = (["checkpoint", "sampler"] + [f"PSNR@{h} (repeat / mean)" for h in horizons]
            + [f"dyn PSNR@{h} (repeat)" for h in horizons] + [f"ΔPSNR@{h}" for h in horizons]
            + [f"ΔPSNR other@{h}" for h in horizons]
            + ["SSIM@" + str(horizons[-1]), "probe acc gen/real", "drift", "first-frame ms", "frame ms",
               "stage train min (steps)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], f"{r['sampler']} {r['steps']}"]
        cells += [f"{_fmt(r[f'psnr@{h}'])} ({_fmt(r[f'repeat@{h}'])} / {_fmt(r[f'mean@{h}'])})"
                  for h in horizons]
        cells += [f"{_fmt(r[f'dyn@{h}'])} ({_fmt(r[f'dyn_repeat@{h}'])})" for h in horizons]
        cells += [_fmt(r[f"dpsnr@{h}"], 2) for h in horizons]
        cells += [_fmt(r.get(f"dpsnr_other@{h}"), 2) for h in horizons]
        cells += [_fmt(r[f"ssim@{horizons[-1]}"], 3),
                  f"{_fmt(r['probe_ratio'], 2)} ({_fmt(r['probe_acc'], 2)} / {_fmt(r['probe_real'], 2)})",
                  r["drift"], _fmt(r["first_frame_ms"]), _fmt(r["frame_ms"]),
                  f"{_fmt(r.get('train_min'))} ({_fmt(r.get('train_steps'))})"]
        lines.append("| " + " | ".join(cells) + " |")
    ceiling = next((r for r in rows if f"tok@{horizons[0]}" in r), None)
    if ceiling is not None:
        # what a perfect latent predictor would score through this tokenizer: where repeat-last is
        # above it (Breakout at h=1), no model decoded by this tokenizer can beat repeat-last
        cells = [f"tokenizer ceiling ({ceiling['name']})", "–"]
        cells += [f"{_fmt(ceiling[f'tok@{h}'])} ({_fmt(ceiling[f'repeat@{h}'])} / {_fmt(ceiling[f'mean@{h}'])})"
                  for h in horizons]
        cells += [f"{_fmt(ceiling[f'dyn_tok@{h}'])} ({_fmt(ceiling[f'dyn_repeat@{h}'])})" for h in horizons]
        cells += ["–"] * (len(head) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    notes = ("\nPSNR/SSIM on uint8 frames at model resolution, mean over held-out clips, frame `anchor + h` "
             "after real context. repeat = last context frame repeated; mean = the training data's "
             "mean frame; tokenizer ceiling = the real frames encoded and decoded by the named checkpoint's "
             "tokenizer; dyn = only pixels where the real frame differs from the last context frame; ΔPSNR = PSNR with "
             "the recorded actions minus PSNR with them shuffled in time (same context and noise); ΔPSNR other = "
             "the same against another held-out clip's actions (a time shuffle keeps commuting actions' end "
             "state, so it reads ~0 at long horizons even for a controllable world); probe = "
             "inverse-dynamics accuracy on generated pairs / on the real pairs at the same positions "
             "(ratio first); drift flags from long random-action rollouts from several held-out contexts "
             "and the world's own reset clips, pooled; stage train min = that stage's own "
             "training loop wall-clock (data generation included, earlier stages not).\n")
    return "\n".join(lines) + "\n" + notes


# ----- plots --------------------------------------------------------------------------------------


def line_plot(series: dict[str, tuple[list[float], list[float]]], path: Path, title: str, ylabel: str,
              size: tuple[int, int] = (720, 480), log2_x: bool = True,
              styles: dict[str, str] | None = None) -> None:
    """A line chart with markers, axes, ticks and a legend, drawn with cv2. x values on a log2
    scale (horizons 1, 4, 16, 64 are evenly spaced). ``styles[name] = "dashed"`` draws a thin
    grey-ish dashed line (baselines)."""
    W, H = size
    left, right, top, bottom = 70, 200, 40, 50
    img = np.full((H, W, 3), 255, np.uint8)
    xs = [x for v in series.values() for x in v[0]]
    ys = [y for v in series.values() for y in v[1] if y is not None and math.isfinite(y)]
    if not xs or not ys:
        cv2.imwrite(str(path), img)
        return
    fx = (lambda x: math.log2(x)) if log2_x else (lambda x: x)
    x0, x1 = fx(min(xs)), fx(max(xs))
    x1 = x1 if x1 > x0 else x0 + 1
    y0, y1 = math.floor(min(ys) / 5) * 5, math.ceil(max(ys) / 5) * 5
    y1 = y1 if y1 > y0 else y0 + 5
    px = lambda x: int(left + (fx(x) - x0) / (x1 - x0) * (W - left - right))  # noqa: E731
    py = lambda y: int(H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom))  # noqa: E731
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.rectangle(img, (left, top), (W - right, H - bottom), (0, 0, 0), 1)
    step = 5 if (y1 - y0) <= 40 else 10
    for y in range(int(y0), int(y1) + 1, step):
        cv2.line(img, (left, py(y)), (W - right, py(y)), (230, 230, 230), 1)
        cv2.putText(img, str(y), (left - 35, py(y) + 5), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    for x in sorted(set(xs)):
        cv2.line(img, (px(x), H - bottom), (px(x), H - bottom + 5), (0, 0, 0), 1)
        cv2.putText(img, f"{x:g}", (px(x) - 8, H - bottom + 20), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, title, (left, 25), font, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "horizon (frames)", (left + (W - left - right) // 2 - 60, H - 12), font, 0.5,
                (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, ylabel, (5, top - 10), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    styles = styles or {}
    for i, (name, (sx, sy)) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)][::-1]  # RGB -> BGR for cv2
        pts = [(px(x), py(y)) for x, y in zip(sx, sy) if y is not None and math.isfinite(y)]
        dashed = styles.get(name) == "dashed"
        for a, b in zip(pts, pts[1:]):
            if dashed:
                n = max(2, int(math.dist(a, b) // 8))
                for k in range(0, n, 2):
                    p = (int(a[0] + (b[0] - a[0]) * k / n), int(a[1] + (b[1] - a[1]) * k / n))
                    q = (int(a[0] + (b[0] - a[0]) * (k + 1) / n), int(a[1] + (b[1] - a[1]) * (k + 1) / n))
                    cv2.line(img, p, q, colour, 1, cv2.LINE_AA)
            else:
                cv2.line(img, a, b, colour, 2, cv2.LINE_AA)
        for p in pts:
            cv2.circle(img, p, 4, colour, -1, cv2.LINE_AA)
        ly = top + 15 + 20 * i
        cv2.line(img, (W - right + 10, ly), (W - right + 30, ly), colour, 2, cv2.LINE_AA)
        cv2.putText(img, name[:22], (W - right + 35, ly + 5), font, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)


def horizon_plots(results: dict[str, dict], out: Path) -> list[Path]:
    """psnr_vs_horizon.png (every model + the two baselines) and psnr_dynamic_vs_horizon.png."""
    first = next(iter(results.values()))
    hs = [int(h) for h in first["fidelity"]]
    paths = []
    for key, fname, title in (
            ("psnr", "psnr_vs_horizon.png", "PSNR vs horizon"),
            ("psnr_dynamic", "psnr_dynamic_vs_horizon.png", "dynamic-region PSNR vs horizon")):
        series = {name: (hs, [m["fidelity"][str(h)][key] for h in hs]) for name, m in results.items()}
        series["repeat last"] = (hs, [first["fidelity"][str(h)]["repeat_last"][key] for h in hs])
        series["mean frame"] = (hs, [first["fidelity"][str(h)]["mean_frame"][key] for h in hs])
        if "tokenizer" in first["fidelity"][str(hs[0])]:
            series["tokenizer ceiling"] = (hs, [first["fidelity"][str(h)]["tokenizer"][key] for h in hs])
        styles = {k: "dashed" for k in ("repeat last", "mean frame", "tokenizer ceiling")}
        line_plot(series, out / fname, title, "dB", styles=styles)
        paths.append(out / fname)
    return paths


# ----- videos -------------------------------------------------------------------------------------


def _label(frame: np.ndarray, text: str, scale: int) -> np.ndarray:
    """Frame (RGB) scaled up by ``scale`` (nearest: pixels stay pixels) with a caption strip."""
    big = cv2.resize(frame, (frame.shape[1] * scale, frame.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
    strip = np.zeros((18, big.shape[1], 3), np.uint8)
    cv2.putText(strip, text[:40], (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([big, strip], axis=0)


def write_video(path: Path, left: np.ndarray | None, right: np.ndarray, captions: list[str],
                titles: tuple[str, str] = ("real", "generated"), fps: int = 15) -> Path:
    """mp4 (mp4v) of ``left | right`` frame sequences (T, H, W, 3) RGB, one caption per frame."""
    scale = max(1, 256 // right.shape[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    try:
        for t in range(len(right)):
            panels = [_label(right[t], f"{titles[1]} {captions[t]}", scale)]
            if left is not None:
                panels.insert(0, _label(left[t], f"{titles[0]} {captions[t]}", scale))
            img = np.concatenate([np.concatenate([p, np.full((p.shape[0], 4, 3), 64, np.uint8)], 1)
                                  for p in panels], axis=1)[:, :-4]
            if writer is None:
                writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                         (img.shape[1], img.shape[0]))
            writer.write(cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    finally:
        if writer is not None:
            writer.release()
    return path


def action_name(names: list[str], a: int) -> str:
    if a < 0:
        return "(none)"
    return names[a] if a < len(names) else f"action {a}"
