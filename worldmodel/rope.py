"""3-D rotary position embedding (time, row, column) for video tokens.

The head dimension is split into three even parts; each part is rotated by the token's position
along one axis (RoFormer, Su et al. 2021, applied per axis as in Wan / Causal Forcing). The
spatial rotation of a token never changes, so keys can be stored in the KV cache with it
already applied; the time rotation is applied at attention time so a rolling cache can re-base
frame positions to the range the model saw in training (see kv_cache.py).

Queries and new keys are rotated in time and space at once (``rotate``): the tables carry, per
dim, the cosine and the signed sine of its angle, and one concatenation of slices builds every
dim's partner. That computes exactly what rotating the time and the spatial dims one after the
other computes, with a third of the tensor ops (per-frame inference at this model size is bound
by the number of ops more than by their FLOPs). Cached keys need only their time dims rotated
(``rotate_time``), which touches a quarter of the head dim.

The spatial part is rotated as ONE half-split over its h + w dims, so a dim with a row angle is
paired with one with a column angle and the pair is not a pure rotation. It is still a fixed
per-token map (spatial positions never change), every trained world learnt with it, and
changing it would change their outputs: it stays, pinned by a test.
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
        # each dim's partner under the half-split rotation of its part (time: the first t dims;
        # space: the other h + w, split in half as one part; pairs (i, i + half)), as slices, and
        # the sign the partner enters with
        half_t, half_s = t // 2, (h + w) // 2
        self._partner = ((half_t, t), (0, half_t), (t + half_s, t + 2 * half_s), (t, t + half_s))
        sign = torch.cat([-torch.ones(half_t), torch.ones(half_t), -torch.ones(half_s), torch.ones(half_s)])
        self.register_buffer("sign", sign, persistent=False)
        self._memo: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def space_tables(self, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for ``rotate``: (frames * P, D) fp32, rotating the spatial dims only (time dims: cos 1, sin 0),
        memoised per frame count (they never change)."""
        key = ("space", frames, self.space_cos.device)
        if key not in self._memo:
            n = frames * self.space_cos.shape[0]
            t = self.dims[0]
            cos = torch.cat([torch.ones(n, t, device=self.space_cos.device), self.space_cos.repeat(frames, 1)], -1)
            sin = torch.cat([torch.zeros(n, t, device=self.space_cos.device), self.space_sin.repeat(frames, 1)], -1)
            self._memo[key] = (cos, sin * self.sign)
        return self._memo[key]

    def _time_rows(self, positions: torch.Tensor, tokens_per_frame: int) -> tuple[torch.Tensor, torch.Tensor]:
        if int(positions.max()) >= self.max_frames or int(positions.min()) < 0:
            raise ValueError(f"RoPE time position out of range [0, {self.max_frames}): "
                             f"{positions.tolist()}")
        d = positions.dim() - 1
        cos = self.time_cos[positions].repeat_interleave(tokens_per_frame, dim=d)
        sin = self.time_sin[positions].repeat_interleave(tokens_per_frame, dim=d)
        return cos, sin * self.sign[:self.dims[0]]

    def time_tables(self, positions: torch.Tensor, tokens_per_frame: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for ``rotate_time``, for frame ``positions`` (..., F): (..., F * P, t) cos and
        signed sin of the time dims."""
        return self._time_rows(positions, tokens_per_frame)

    def rotate_time(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate only the time dims of ``x`` (B, H, L, D) with ``time_tables`` (L, t) / (B, L, t)."""
        t, half = self.dims[0], self.dims[0] // 2
        if cos.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]
        xt = x[..., :t]
        partner = torch.cat([xt[..., half:], xt[..., :half]], -1)
        return torch.cat([xt * cos.to(x.dtype) + partner * sin.to(x.dtype), x[..., t:]], -1)

    def tables(self, positions: torch.Tensor, tokens_per_frame: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for ``rotate`` that rotate time and space: frame ``positions`` (..., F) of whole
        frames of ``tokens_per_frame`` tokens -> (..., F * P, D) cos and signed sin."""
        cos, sin = self._time_rows(positions, tokens_per_frame)
        scos, ssin = self.space_tables(positions.shape[-1])
        t = self.dims[0]
        scos, ssin = scos[:, t:].expand(*cos.shape[:-1], -1), ssin[:, t:].expand(*sin.shape[:-1], -1)
        return torch.cat([cos, scos], -1), torch.cat([sin, ssin], -1)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` (B, H, L, D) with full-dim tables (L, D) or per world (B, L, D) from
        ``tables`` or ``space_tables``: x * cos + partner(x) * signed sin."""
        if cos.dim() == 3:  # per-world positions: broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        partner = torch.cat([x[..., a:b] for a, b in self._partner], -1)
        return x * cos.to(x.dtype) + partner * sin.to(x.dtype)
