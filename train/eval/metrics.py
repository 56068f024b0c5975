"""Image metrics for evaluation, on uint8 frames at model resolution: PSNR, SSIM, dynamic-region
PSNR, and the frame statistics the drift check uses.

Every function takes frames ``(..., H, W, 3)`` uint8 (or anything numpy turns into that) and
returns one value per frame, so callers can average, mask or group as they need. Aggregates
over many frames use ``mean_db``: a per-frame PSNR is infinite for identical frames, so it is
capped at ``PSNR_CAP`` before averaging (a mean with one infinite term says nothing, and JSON
cannot hold it).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

PEAK = 255.0
PSNR_CAP = 100.0           # dB: identical frames count as this in averages (uint8 noise floor ~ 59 dB)
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5          # Wang et al. 2004
SSIM_C1, SSIM_C2 = (0.01 * PEAK) ** 2, (0.03 * PEAK) ** 2


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim < 3 or a.shape[-1] != 3:
        raise ValueError(f"expected two frame arrays (..., H, W, 3) of one shape, got {a.shape} and "
                         f"{b.shape}")
    return a.astype(np.float64), b.astype(np.float64)


def mse(a, b) -> np.ndarray:
    """Mean squared error per frame, in uint8 levels squared: shape a.shape[:-3]."""
    x, y = _pair(a, b)
    return ((x - y) ** 2).mean(axis=(-3, -2, -1))


def psnr_from_mse(m) -> np.ndarray:
    """10 log10(255^2 / mse); +inf where mse == 0."""
    m = np.asarray(m, np.float64)
    with np.errstate(divide="ignore"):
        return np.where(m > 0, 10.0 * np.log10(PEAK**2 / np.maximum(m, 1e-300)), np.inf)


def psnr(a, b) -> np.ndarray:
    """PSNR in dB per frame (inf for identical frames)."""
    return psnr_from_mse(mse(a, b))


def dynamic_mask(real, last_context) -> np.ndarray:
    """(..., H, W) bool: pixels where the real frame differs from the last context frame in any
    channel. On games the static background dominates plain PSNR; these are the pixels a model
    has to get right and that repeating the last frame gets wrong."""
    r, c = np.asarray(real), np.asarray(last_context)
    return (r != np.broadcast_to(c, r.shape)).any(axis=-1)


def masked_psnr(a, b, mask) -> np.ndarray:
    """PSNR per frame over the pixels of ``mask`` (..., H, W) only; NaN where the mask is empty."""
    x, y = _pair(a, b)
    m = np.asarray(mask, bool)
    se = ((x - y) ** 2).sum(axis=-1)               # (..., H, W), summed over channels
    n = m.sum(axis=(-2, -1)) * 3
    total = (se * m).sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = psnr_from_mse(np.where(n > 0, total / np.maximum(n, 1), 1.0))
    return np.where(n > 0, out, np.nan)


def _ssim_single(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of two (H, W) float64 images: the mean of the SSIM map with an 11x11 Gaussian
    window (sigma 1.5), reflected borders (cv2's default), standard constants."""
    blur = lambda im: cv2.GaussianBlur(im, (SSIM_WINDOW, SSIM_WINDOW), SSIM_SIGMA)  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    num = (2 * mx * my + SSIM_C1) * (2 * cxy + SSIM_C2)
    den = (mx * mx + my * my + SSIM_C1) * (vx + vy + SSIM_C2)
    return float((num / den).mean())


def ssim(a, b) -> np.ndarray:
    """SSIM per frame (mean over the three channels), 1.0 for identical frames."""
    x, y = _pair(a, b)
    lead = x.shape[:-3]
    xf, yf = x.reshape(-1, *x.shape[-3:]), y.reshape(-1, *y.shape[-3:])
    out = np.array([np.mean([_ssim_single(xf[i, ..., c], yf[i, ..., c]) for c in range(3)])
                    for i in range(len(xf))])
    return out.reshape(lead)


def mean_db(values) -> float:
    """Mean of per-frame dB values with +inf capped at PSNR_CAP and NaN ignored; NaN if empty."""
    v = np.asarray(values, np.float64).ravel()
    v = v[~np.isnan(v)]
    if v.size == 0:
        return math.nan
    return float(np.minimum(v, PSNR_CAP).mean())


def nanmean(values) -> float:
    v = np.asarray(values, np.float64).ravel()
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else math.nan


# ----- frame statistics (drift) -------------------------------------------------------------


def frame_stats(frames) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame mean and spatial standard deviation of the pixel values, (N,) each."""
    f = np.asarray(frames, np.float64).reshape(len(frames), -1)
    return f.mean(axis=1), f.std(axis=1)


def colour_spread(frames) -> np.ndarray:
    """Per-frame spatial standard deviation of each colour channel, averaged over channels: (N,).
    Near 0 for a frame of one colour, even a saturated one (whose all-pixel std `frame_stats`
    reads as high, because its channels differ)."""
    f = np.asarray(frames, np.float64)
    return f.reshape(len(f), -1, f.shape[-1]).std(axis=1).mean(axis=1)


def consecutive_diff(frames) -> np.ndarray:
    """Mean absolute difference between consecutive frames, in levels: (N - 1,)."""
    f = np.asarray(frames, np.float64)
    return np.abs(f[1:] - f[:-1]).mean(axis=(-3, -2, -1))
