"""Metrics of a run: one JSON object per line in `metrics.jsonl`, and `metrics.png`, a grid of
curves (one panel per metric) drawn with OpenCV, so plotting needs nothing beyond the project's
dependencies."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np

PANEL_W, PANEL_H = 360, 220          # pixels per curve panel
MARGIN_L, MARGIN_B, MARGIN_T = 56, 22, 22
MAX_PANELS = 16
BG, AXIS, LINE, TEXT = (255, 255, 255), (90, 90, 90), (200, 90, 30), (20, 20, 20)  # BGR


class MetricsLog:
    """Append-only JSONL metrics file. On resume, records past the resumed step (written by the
    interrupted run after its last checkpoint) are dropped, so the log matches an uninterrupted
    run's."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()  # a fresh run starts a fresh log

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_metrics(records: list[dict], out: Path) -> None:
    """Draw every numeric metric against `step` into one PNG (written atomically)."""
    keys = sorted({k for r in records for k, v in r.items()
                   if k not in ("step", "time") and isinstance(v, (int, float))})[:MAX_PANELS]
    if not keys:
        return
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    canvas = np.full((rows * PANEL_H, cols * PANEL_W, 3), BG, np.uint8)
    for i, key in enumerate(keys):
        pts = [(r["step"], float(r[key])) for r in records if key in r and math.isfinite(float(r[key]))]
        y0, x0 = (i // cols) * PANEL_H, (i % cols) * PANEL_W
        _panel(canvas[y0:y0 + PANEL_H, x0:x0 + PANEL_W], key, pts)
    tmp = out.with_suffix(".tmp.png")
    cv2.imwrite(str(tmp), canvas)
    tmp.replace(out)


def _panel(img: np.ndarray, title: str, pts: list[tuple[int, float]]) -> None:
    """One curve with a labelled box: min/max of each axis at its ends."""
    h, w = img.shape[:2]
    box = (MARGIN_L, MARGIN_T, w - 10, h - MARGIN_B)  # left, top, right, bottom
    cv2.rectangle(img, box[:2], box[2:], AXIS, 1)
    cv2.putText(img, title, (MARGIN_L, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, TEXT, 1, cv2.LINE_AA)
    if not pts:
        return
    xs = np.array([p[0] for p in pts], np.float64)
    ys = np.array([p[1] for p in pts], np.float64)
    x_lo, x_hi = xs.min(), max(xs.max(), xs.min() + 1)
    y_lo, y_hi = ys.min(), ys.max()
    if y_hi - y_lo < 1e-12:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    px = box[0] + (xs - x_lo) / (x_hi - x_lo) * (box[2] - box[0])
    py = box[3] - (ys - y_lo) / (y_hi - y_lo) * (box[3] - box[1])
    poly = np.stack([px, py], 1).round().astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(img, [poly], False, LINE, 1, cv2.LINE_AA)
    font, s = cv2.FONT_HERSHEY_SIMPLEX, 0.35
    cv2.putText(img, f"{y_hi:.4g}", (2, box[1] + 8), font, s, TEXT, 1, cv2.LINE_AA)
    cv2.putText(img, f"{y_lo:.4g}", (2, box[3]), font, s, TEXT, 1, cv2.LINE_AA)
    cv2.putText(img, f"{int(x_lo)}", (box[0], h - 6), font, s, TEXT, 1, cv2.LINE_AA)
    cv2.putText(img, f"{int(x_hi)}", (box[2] - 40, h - 6), font, s, TEXT, 1, cv2.LINE_AA)
