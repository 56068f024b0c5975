"""Causal diffusion transformer over latent video, one set of weights for three attention layouts.

Per frame the sequence holds ONE action token (embedding of the action id; a null id for "no
action" and for classifier-free-guidance dropout) followed by the latent patch tokens. Each frame
has its own noise level, which drives adaptive LayerNorm (adaLN-Zero, Peebles & Xie 2023) for
all of that frame's tokens, so clean context (sigma = 0) and noisy frames share one sequence.
q/k are RMS-normalised (qk-norm) and rotated with 3-D RoPE (time, row, column).

Layouts (``attention.py`` has the mask rule):

* ``forward(x, sigma, actions)`` — bidirectional over all frames (teacher, critic);
* ``forward(x, sigma, actions, clean=x0)`` — teacher forcing: [clean copy | noisy copy] with the
  block-causal mask (a noisy frame sees its own block's noisy tokens and the clean copies of
  earlier blocks; the clean copy is causal by block), output for the noisy copy only;
* ``forward_cached(x, sigma, actions, cache)`` — one block against a ``KVCache`` of clean past
  frames; ``refresh(x0, actions, cache)`` writes a block's clean K/V (sigma = 0).

The network predicts the flow velocity ``v = eps - x0`` (``diffusion.py`` converts). The output
head and all adaLN gates start at zero, so a fresh model predicts v = 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from worldmodel.attention import attend, causal_mask, teacher_forcing_mask
from worldmodel.kv_cache import KVCache
from worldmodel.rope import Rope3D


@dataclass
class DiTConfig:
    """Shape of the transformer and of the latents it models."""

    width: int = 256
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    latent_size: int = 8           # latents are (latent_size, latent_size, latent_channels)
    latent_channels: int = 8
    patch: int = 1                 # patch side in latent pixels
    num_actions: int = 18          # ids 0..num_actions-1; num_actions is the null id
    frames_per_block: int = 1      # 1 = frame-wise, k = chunk-wise
    max_frames: int = 64           # RoPE time table length; positions must stay below it
    train_frames: int = 16         # clip length seen in training: inference positions stay below it
    action_in_adaln: bool = True   # also add the action embedding to the adaLN condition
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} not divisible by heads {self.heads}")
        if self.latent_size % self.patch:
            raise ValueError(f"latent_size {self.latent_size} not divisible by patch {self.patch}")
        if self.train_frames > self.max_frames:
            raise ValueError("train_frames must not exceed max_frames (the RoPE table)")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def patches_per_side(self) -> int:
        return self.latent_size // self.patch

    @property
    def tokens_per_frame(self) -> int:
        return self.patches_per_side ** 2 + 1  # + the action token

    @property
    def null_action(self) -> int:
        return self.num_actions

    def to_dict(self) -> dict:
        return asdict(self)


DIT_SIZES: dict[str, dict] = {
    "tiny": dict(width=64, depth=2, heads=2),
    # small: 2x2 latent patches (16 + 1 tokens per frame) — the size that plays 2-step at >= 30 FPS
    # on 2 CPU cores; with 1x1 patches (65 tokens) the same width/depth ran ~25 FPS.
    "small": dict(width=256, depth=6, heads=4, patch=2),
    "base": dict(width=384, depth=8, heads=6),
}


def timestep_embedding(sigma: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t = 1000 * sigma (fp32 always), sigma (...,) -> (..., dim)."""
    t = sigma.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    ang = t[..., None] * freqs
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class Attention(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def qkv_heads(self, x: torch.Tensor):
        """x (B, L, W) -> q, k, v (B, H, L, D), q and k RMS-normed (not yet rotated)."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # weights cast to the activations' dtype: under autocast the fused RMSNorm needs them equal
        q = F.rms_norm(q, (self.head_dim,), self.q_norm.weight.to(q.dtype), self.q_norm.eps)
        k = F.rms_norm(k, (self.head_dim,), self.k_norm.weight.to(k.dtype), self.k_norm.eps)
        return q, k, v

    def out(self, o: torch.Tensor) -> torch.Tensor:
        b, h, n, d = o.shape
        return self.proj(o.transpose(1, 2).reshape(b, n, h * d))


class Block(nn.Module):
    """Transformer block with per-frame adaLN-Zero modulation."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        w = cfg.width
        self.norm1 = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        hidden = int(w * cfg.mlp_ratio)
        # exact GELU: the tanh approximation is ~3x slower on CPU (measured)
        self.mlp = nn.Sequential(nn.Linear(w, hidden), nn.GELU(), nn.Linear(hidden, w))
        self.ada = nn.Linear(w, 6 * w)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def pre(self, x: torch.Tensor, mods: tuple, rope: Rope3D, tables: tuple, store: bool = False):
        """x (B, F, P, W), this block's modulation (``DiT.modulations``), RoPE ``tables`` for the
        queries' positions -> q, k rotated by them, v (B, H, F*P, D), and with ``store`` the keys
        rotated in space only (as the KV cache keeps them; else None)."""
        b, f, p, w = x.shape
        h = modulate(self.norm1(x), mods[0], mods[1]).reshape(b, f * p, w)
        q, k, v = self.attn.qkv_heads(h)
        k_store = rope.rotate(k, *rope.space_tables(f)) if store else None
        return rope.rotate(q, *tables), rope.rotate(k, *tables), k_store, v

    def post(self, x: torch.Tensor, o: torch.Tensor, mods) -> torch.Tensor:
        """Attention output o (B, H, F*P, D) -> updated x (B, F, P, W)."""
        _, _, g1, sh2, sc2, g2 = mods
        x = x + g1 * self.attn.out(o).view(x.shape)
        return x + g2 * self.mlp(modulate(self.norm2(x), sh2, sc2))


class DiT(nn.Module):
    """Action-conditioned latent video transformer; see the module docstring for the layouts."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w, c, p = cfg.width, cfg.latent_channels, cfg.patch
        self.patch_in = nn.Linear(p * p * c, w)
        self.action_token = nn.Embedding(cfg.num_actions + 1, w)
        self.action_cond = nn.Embedding(cfg.num_actions + 1, w) if cfg.action_in_adaln else None
        if self.action_cond is not None:
            nn.init.zeros_(self.action_cond.weight)  # starts as a pure token-conditioned model
        self.t_embed = nn.Sequential(nn.Linear(256, w), nn.SiLU(), nn.Linear(w, w))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(w, 2 * w)
        self.head = nn.Linear(w, p * p * c)
        for m in (self.ada_out, self.head):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        s = cfg.patches_per_side
        self.rope = Rope3D(cfg.head_dim, s, s, extra=1, max_frames=cfg.max_frames)

    # ---- tokens in / out -------------------------------------------------------------------
    def _actions(self, actions: torch.Tensor) -> torch.Tensor:
        """Map NULL_ACTION (-1) to the model's null id."""
        return torch.where(actions < 0, torch.full_like(actions, self.cfg.null_action), actions)

    def embed(self, x: torch.Tensor, sigma: torch.Tensor, actions: torch.Tensor):
        """latents (B, F, h, w, c), sigma (B, F), actions (B, F) -> tokens (B, F, P, W), cond (B, F, W)."""
        b, f, hh, ww, c = x.shape
        p, s = self.cfg.patch, self.cfg.patches_per_side
        dtype = self.patch_in.weight.dtype
        patches = x.to(dtype).view(b, f, s, p, s, p, c).permute(0, 1, 2, 4, 3, 5, 6)
        patches = patches.reshape(b, f, s * s, p * p * c)
        a = self._actions(actions)
        tokens = torch.cat([self.action_token(a)[:, :, None], self.patch_in(patches)], dim=2)
        cond = self.t_embed(timestep_embedding(sigma, 256).to(dtype))
        if self.action_cond is not None:
            cond = cond + self.action_cond(a)
        return tokens, cond

    def unembed(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """tokens (B, F, P, W) -> velocity (B, F, h, w, c) in fp32."""
        b, f = tokens.shape[:2]
        p, s, c = self.cfg.patch, self.cfg.patches_per_side, self.cfg.latent_channels
        shift, scale = self.ada_out(F.silu(cond))[:, :, None].chunk(2, dim=-1)
        out = self.head(modulate(self.norm_out(tokens[:, :, 1:]), shift, scale))  # drop action token
        out = out.view(b, f, s, s, p, p, c).permute(0, 1, 2, 4, 3, 5, 6)
        return out.reshape(b, f, s * p, s * p, c).float()

    def modulations(self, cond: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Every block's six adaLN tensors (B, F, 1, W) from cond (B, F, W).

        At inference (no grad) all blocks' projections run as one matmul over their stacked
        weights: a 1-row linear costs about as much as a 17-row one on a CPU, so six of them per
        call were six times the cost of one. The stack is rebuilt whenever a weight changes.
        """
        act = F.silu(cond)
        if torch.is_grad_enabled():
            return [blk.ada(act)[:, :, None].chunk(6, dim=-1) for blk in self.blocks]
        weight, bias = self._stacked_ada()
        out = F.linear(act, weight.to(act.dtype), bias.to(act.dtype))[:, :, None]
        return list(zip(*[iter(out.chunk(6 * len(self.blocks), dim=-1))] * 6))

    def _stacked_ada(self) -> tuple[torch.Tensor, torch.Tensor]:
        params = [p for blk in self.blocks for p in (blk.ada.weight, blk.ada.bias)]
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if getattr(self, "_ada_key", None) != key:
            self._ada_stack = (torch.cat([blk.ada.weight for blk in self.blocks]),
                               torch.cat([blk.ada.bias for blk in self.blocks]))
            self._ada_key = key
        return self._ada_stack

    # ---- full-sequence layouts -------------------------------------------------------------
    def forward(self, x: torch.Tensor, sigma: torch.Tensor, actions: torch.Tensor,
                clean: torch.Tensor | None = None, causal: bool = False,
                cache: KVCache | None = None) -> torch.Tensor:
        """Velocity for every frame of ``x`` (B, F, h, w, c) at noise levels ``sigma`` (B, F).

        ``clean`` (B, F, h, w, c): teacher forcing — frames attend clean ground truth of earlier
        blocks. ``cache``: ``x`` is one block attending the cache (= ``forward_cached``; routed
        through ``forward`` so DDP sees the call). Otherwise the layout is bidirectional, or
        block-causal over ``x`` if ``causal``.
        """
        if cache is not None:
            return self.forward_cached(x, sigma, actions, cache)
        b, f = x.shape[:2]
        if f > self.cfg.max_frames:
            raise ValueError(f"{f} frames exceed the RoPE table ({self.cfg.max_frames})")
        cfg, dev = self.cfg, x.device
        tokens, cond = self.embed(x, sigma, actions)
        if clean is not None:
            ctok, ccond = self.embed(clean, torch.zeros_like(sigma), actions)
            tokens, cond = torch.cat([ctok, tokens], 1), torch.cat([ccond, cond], 1)
            mask = teacher_forcing_mask(f, cfg.tokens_per_frame, cfg.frames_per_block, str(dev))
        elif causal:
            mask = causal_mask(f, cfg.tokens_per_frame, cfg.frames_per_block, str(dev))
        else:
            mask = None
        positions = torch.arange(f, device=dev)
        if clean is not None:
            positions = torch.cat([positions, positions])  # both copies share RoPE positions
        tables = self.rope.tables(positions, cfg.tokens_per_frame)
        for blk, mods in zip(self.blocks, self.modulations(cond)):
            q, k, _, v = blk.pre(tokens, mods, self.rope, tables)
            tokens = blk.post(tokens, attend(q, k, v, mask, cfg.attention_backend), mods)
        if clean is not None:
            tokens, cond = tokens[:, f:], cond[:, f:]
        return self.unembed(tokens, cond)

    # ---- KV-cache layout -------------------------------------------------------------------
    def new_cache(self, batch: int, window: int, sink: int = 0,
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache for ``batch`` worlds; device/dtype default to the model's."""
        ref = self.patch_in.weight
        k = self.cfg.frames_per_block
        if window % k or sink % k:
            raise ValueError(f"window ({window}) and sink ({sink}) must be multiples of "
                             f"frames_per_block ({k}) so whole blocks are evicted")
        if sink + window + k > self.cfg.train_frames:
            raise ValueError(f"sink + window + block = {sink + window + k} frames exceeds the "
                             f"{self.cfg.train_frames}-frame clips the model was trained on; "
                             "use a smaller window")
        return KVCache(self.cfg.depth, batch, self.cfg.heads, self.cfg.head_dim,
                       self.cfg.tokens_per_frame, window, sink,
                       device=device or ref.device, dtype=dtype or ref.dtype)

    def _cached(self, x: torch.Tensor, sigma: torch.Tensor, actions: torch.Tensor,
                cache: KVCache, write: bool, causal: bool = False):
        """Run ``x`` against the cache -> final tokens and cond (the head is the caller's).

        ``x`` is one block, or with ``causal`` several whole blocks that attend block-causally
        among themselves (only valid when writing them evicts nothing; see ``refresh``).
        """
        b, f = x.shape[:2]
        p = self.cfg.tokens_per_frame
        tokens, cond = self.embed(x, sigma, actions)
        lay = cache.layout(f)
        qtables = self.rope.tables(lay.query_positions.to(x.device), p)
        if lay.valid_slots:
            ktables = self.rope.time_tables(lay.slot_positions.to(x.device), p)
        mask = None
        new = causal_mask(f, p, self.cfg.frames_per_block, str(x.device)) if causal else None
        if lay.key_mask is not None:  # worlds at different frames: mask their empty slots
            old = lay.key_mask.repeat_interleave(p, dim=1).to(x.device)
            if new is None:
                keys = torch.cat([old, torch.ones(b, f * p, dtype=torch.bool, device=x.device)], dim=1)
                mask = keys[:, None, None, :]  # (B, 1, 1, Lk): same for every head and query
            else:
                mask = torch.cat([old[:, None, None, :].expand(b, 1, f * p, -1),
                                  new.expand(b, 1, f * p, f * p)], dim=-1)  # (B, 1, Lq, Lk)
        elif new is not None:
            mask = torch.cat([torch.ones(f * p, lay.valid_slots * p, dtype=torch.bool, device=x.device),
                              new], dim=1)  # (Lq, Lk)
        for layer, (blk, mods) in enumerate(zip(self.blocks, self.modulations(cond))):
            q, k, k_new, v = blk.pre(tokens, mods, self.rope, qtables, store=write)
            v_new = v
            if lay.valid_slots:
                ck, cv = cache.read(layer, lay)
                k = torch.cat([self.rope.rotate_time(ck, *ktables), k], dim=2)
                v = torch.cat([cv, v], dim=2)
            # The cache holds only clean frames of earlier blocks and the block itself is
            # bidirectional — exactly the teacher-forcing rule, so no mask beyond empty slots.
            o = attend(q, k, v, mask, self.cfg.attention_backend)
            if write:
                # After attending: in a full ring this slot still holds the frame being evicted,
                # which this block's queries must see. Stored without the time rotation.
                cache.write(layer, k_new, v_new)
            tokens = blk.post(tokens, o, mods)
        return tokens, cond

    def forward_cached(self, x: torch.Tensor, sigma: torch.Tensor, actions: torch.Tensor,
                       cache: KVCache) -> torch.Tensor:
        """Velocity for one block ``x`` (B, k, h, w, c) given the cache; the cache is unchanged."""
        return self.unembed(*self._cached(x, sigma, actions, cache, write=False))

    @torch.no_grad()
    def refresh(self, x0: torch.Tensor, actions: torch.Tensor, cache: KVCache) -> None:
        """Write the clean K/V of ``x0`` (B, n*k, h, w, c), one or more whole blocks, at sigma = 0
        and advance the cache: the same K/V as refreshing block after block.

        Several blocks that fit in the cache without evicting go in one block-causal pass (seeding
        a context: one model call instead of one per frame); otherwise block by block, since an
        eviction changes what the later blocks may see. To re-seed single worlds of a batch, pass
        ``cache.row(j)`` and that world's rows.
        """
        k, f = self.cfg.frames_per_block, x0.shape[1]
        if f % k:
            raise ValueError(f"refresh takes whole blocks of {k} frames, got {f}")
        if f > k and max(cache.counts) + f > cache.slots:
            for s in range(0, f, k):
                self.refresh(x0[:, s:s + k], actions[:, s:s + k], cache)
            return
        sigma = torch.zeros(x0.shape[:2], device=x0.device)
        self._cached(x0, sigma, actions, cache, write=True, causal=f > k)  # output head skipped
        cache.advance(f)

    def compile_blocks(self, **kwargs) -> None:
        """torch.compile each block's dense parts; cache bookkeeping stays eager Python."""
        for blk in self.blocks:
            blk.pre = torch.compile(blk.pre, dynamic=False, **kwargs)
            blk.post = torch.compile(blk.post, dynamic=False, **kwargs)


def build_dit(size: str = "small", **overrides) -> DiT:
    """A DiT of a named size (``DIT_SIZES``) with config overrides."""
    if size not in DIT_SIZES:
        raise ValueError(f"unknown model size {size!r}; known: {sorted(DIT_SIZES)}")
    return DiT(DiTConfig(**{**DIT_SIZES[size], **overrides}))
