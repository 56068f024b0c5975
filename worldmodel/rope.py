"""3-D rotary position embedding (time, row, column) for video tokens.

The head dimension is split into three even parts; each part is rotated by the token's position
along one axis (RoFormer, Su et al. 2021, applied per axis as in Wan / Causal Forcing, reference
§1). The spatial rotation of a token never changes, so keys can be stored in the KV cache with it
already applied; the time rotation is applied at attention time (``rotate_time``) so a rolling
cache can re-base frame positions to the range the model saw in training (see kv_cache.py).
"""

from __future__ import annotations

import torch


def split_head_dim(head_dim: int, time_fraction: float = 0.25) -> tuple[int, int, int]:
    """Split ``head_dim`` into even (time, row, column) parts, time ~ ``time_fraction`` of it."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    t = max(2, int(round(head_dim * time_fraction / 2)) * 2)
    rest = head_dim - t
    h = (rest // 4) * 2  # even
    w = rest - h
    if min(t, h, w) <= 0 or w % 2:
        raise ValueError(f"head_dim {head_dim} too small for 3-D RoPE")
    return t, h, w


def _freqs(dim: int, theta: float) -> torch.Tensor:
    """Inverse frequencies for ``dim`` rotated dims (dim/2 pairs), fp64 for exact tables."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def cos_sin(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for integer ``positions`` (...,) -> two (..., dim) fp32 tensors.

    Angles are computed in fp64 so large positions keep full precision before the fp32 cast.
    """
    ang = positions.to(torch.float64)[..., None] * _freqs(dim, theta).to(positions.device)
    ang = torch.cat([ang, ang], dim=-1)  # half-split layout: pairs (i, i + dim/2)
    return ang.cos().float(), ang.sin().float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


class Rope3D(torch.nn.Module):
    """Precomputed rotary tables for a frame of ``rows x cols`` patch tokens plus extra tokens.

    Token layout inside a frame: ``extra`` conditioning tokens first (spatial position (0, 0)),
    then the patch tokens in row-major order at spatial positions (r + 1, c + 1).
    """

    def __init__(self, head_dim: int, rows: int, cols: int, extra: int, max_frames: int,
                 theta: float = 10000.0) -> None:
        super().__init__()
        self.dims = split_head_dim(head_dim)
        self.theta = theta
        t, h, w = self.dims
        r = torch.cat([torch.zeros(extra, dtype=torch.long),
                       torch.arange(rows).repeat_interleave(cols) + 1])
        c = torch.cat([torch.zeros(extra, dtype=torch.long), torch.arange(cols).repeat(rows) + 1])
        cr, sr = cos_sin(r, h, theta)
        cc, sc = cos_sin(c, w, theta)
        # (P, h + w): spatial tables for one frame's tokens.
        self.register_buffer("space_cos", torch.cat([cr, cc], -1), persistent=False)
        self.register_buffer("space_sin", torch.cat([sr, sc], -1), persistent=False)
        tc, ts = cos_sin(torch.arange(max_frames), t, theta)
        self.register_buffer("time_cos", tc, persistent=False)  # (max_frames, t)
        self.register_buffer("time_sin", ts, persistent=False)
        self.max_frames = max_frames
        self._memo_key: tuple | None = None
        self._memo: tuple[torch.Tensor, torch.Tensor] | None = None

    def _space_tables(self, frames: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(frames * P, h + w) tables, memoised: they are rebuilt only when the shape changes."""
        key = (frames, dtype, self.space_cos.device)
        if self._memo_key != key:
            self._memo = (self.space_cos.repeat(frames, 1).to(dtype), self.space_sin.repeat(frames, 1).to(dtype))
            self._memo_key = key
        return self._memo

    def rotate_space(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """Rotate the spatial dims of ``x`` (B, H, frames * P, D); time dims untouched."""
        t = self.dims[0]
        cos, sin = self._space_tables(frames, x.dtype)
        return torch.cat([x[..., :t], _rotate(x[..., t:], cos, sin)], dim=-1)

    def time_tables(self, positions: torch.Tensor, tokens_per_frame: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token time tables for frame ``positions`` (..., F) -> (..., F * P, t) cos and sin."""
        if int(positions.max()) >= self.max_frames or int(positions.min()) < 0:
            raise ValueError(f"RoPE time position out of range [0, {self.max_frames}): "
                             f"{positions.tolist()}")
        d = positions.dim() - 1
        cos = self.time_cos[positions].repeat_interleave(tokens_per_frame, dim=d)
        sin = self.time_sin[positions].repeat_interleave(tokens_per_frame, dim=d)
        return cos, sin

    def rotate_time(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the time dims of ``x`` (B, H, L, D) with per-token tables (L, t) or (B, L, t)."""
        t = self.dims[0]
        if cos.dim() == 3:  # per-world positions: broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        return torch.cat([_rotate(x[..., :t], cos.to(x.dtype), sin.to(x.dtype)), x[..., t:]], -1)
