"""Generating frames from a world checkpoint for evaluation, under two protocols.

``engine`` (every causal model: ar, causal_ode, causal_cd, dmd, frame- or chunk-wise): the real
context frames are written into the engine's rolling KV cache (``Engine.reset``) and the future
is rolled out one ``Engine.step`` at a time with the given actions: exactly what play does.

``joint`` (the bidirectional teacher, which has no causal cache): the future is generated in
windows of the model's training clip length. Each window holds ``ctx = train_frames // 2`` known
frames (real context, later the newest generated ones) and ``train_frames - ctx`` new frames,
denoised jointly by the sampler's Euler steps with the recorded actions on every frame. The known
frames are fixed by replacement: at every step they are re-noised to the current sigma (with
one noise draw per window) and only the new frames are integrated, as in "replacement"
conditioning for video diffusion. The teacher was trained with one sigma for the whole clip,
so this keeps every input in distribution. A context teacher (trained with up to ``ctx`` clean
leading frames, world info ``context_frames``) gets its known frames clean at sigma 0 instead,
as it was trained. Horizons beyond one window are reached by sliding.

Both take the same noise seed for the recorded and the shuffled actions, so a Δ-PSNR compares
the actions and nothing else.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from worldmodel import diffusion, samplers
from worldmodel.checkpoint import World
from worldmodel.engine import Engine, EngineConfig, auto_dtype

PROTOCOLS = ("auto", "engine", "joint")


def pick_protocol(world: World, requested: str = "auto") -> str:
    """``joint`` for a bidirectional teacher's world, ``engine`` otherwise (or as requested)."""
    if requested not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {requested!r}")
    if requested != "auto":
        return requested
    return "joint" if world.info.get("stage") == "teacher" else "engine"


def engine_context(world: World, config: EngineConfig) -> int:
    """Frames the engine's cache holds (sink + window), i.e. the real context it can use."""
    k = world.dit.cfg.frames_per_block
    sink = -(-config.sink // k) * k
    window = config.window
    if window is None:
        window = world.dit.cfg.train_frames - sink - k
        window -= window % k
    return sink + window


class EngineRollout:
    """Causal models through the play-time ``Engine``."""

    protocol = "engine"

    def __init__(self, world: World, config: EngineConfig) -> None:
        self.world, self.config = world, config
        self.context = engine_context(world, config)
        self.block = world.dit.cfg.frames_per_block

    def engine(self, batch: int) -> Engine:
        return Engine(self.world, self.config, batch=batch)

    def run(self, context: np.ndarray, context_actions: np.ndarray, actions: np.ndarray, seed: int,
            on_frame=None) -> np.ndarray:
        """context uint8 (B, C, H, W, 3) + actions (B, C), future actions (B, T) -> frames (B, T, H, W, 3).
        ``on_frame(t, seconds)`` is told the wall time of every frame (step + refresh)."""
        eng = self.engine(len(context))
        eng.reset(context, context_actions, seed=seed)
        eng.flush()
        out = []
        for t in range(actions.shape[1]):
            t0 = time.perf_counter()
            out.append(eng.step(actions[:, t]))
            eng.flush()  # the refresh belongs to every frame's cost
            if on_frame is not None:
                on_frame(t, time.perf_counter() - t0)
        return np.stack(out, axis=1)

    def first_frame_ms(self) -> float:
        eng = self.engine(1)
        eng.reset(None, seed=0)
        return float(eng.timing.get("total_ms", float("nan")))


class JointRollout:
    """The bidirectional teacher by windowed joint generation with replacement (module docstring)."""

    protocol = "joint"

    def __init__(self, world: World, config: EngineConfig) -> None:
        self.world, self.config = world, config
        self.device = torch.device(config.device)
        self.dtype = auto_dtype(self.device) if config.dtype == "auto" else getattr(torch, config.dtype)
        self.dit = world.dit.to(self.device, self.dtype).eval()
        self.tokenizer = world.tokenizer.to(self.device, self.dtype).eval()
        for name, buf in self.tokenizer.named_buffers():  # latent statistics stay fp32
            if "latent_" in name:
                buf.data = buf.data.float()
        train = world.dit.cfg.train_frames
        self.context = max(1, train // 2)
        self.new = max(1, train - self.context)
        # a context teacher takes its known frames clean; any other by replacement
        self.clean_known = int(world.info.get("context_frames", 0)) >= self.context
        self.last_chunk_ms: list[float] = []

    def _denoiser(self, known: torch.Tensor, eps: torch.Tensor, acts: torch.Tensor):
        k = known.shape[1]

        def cond(a: torch.Tensor):
            def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
                s = sigma[:, :1]  # one level for the whole window, as in training
                full_sigma = s.expand(-1, k + x.shape[1])
                if self.clean_known:
                    full_sigma = torch.cat([torch.zeros_like(s).expand(-1, k), s.expand(-1, x.shape[1])], 1)
                    full = torch.cat([known, x], dim=1)
                else:
                    full = torch.cat([diffusion.add_noise(known, eps, s.expand(-1, k)), x], dim=1)
                v = self.dit(full, full_sigma, a)
                return diffusion.x0_from_velocity(full, v, full_sigma)[:, k:]
            return denoise

        if self.config.cfg_scale == 1.0:
            return cond(acts)
        return samplers.cfg_denoiser(cond(acts), cond(torch.full_like(acts, -1)), self.config.cfg_scale)

    @torch.no_grad()
    def run(self, context: np.ndarray, context_actions: np.ndarray, actions: np.ndarray, seed: int,
            on_frame=None) -> np.ndarray:
        g = torch.Generator(self.device).manual_seed(seed)
        cfg = self.dit.cfg
        shape = (cfg.latent_size, cfg.latent_size, cfg.latent_channels)
        ctx = torch.from_numpy(np.ascontiguousarray(context[:, -self.context:])).to(self.device)
        hist = self.tokenizer.encode(ctx).float()                       # (B, c, h, w, ch)
        all_acts = torch.from_numpy(np.concatenate([context_actions[:, -self.context:], actions], 1)
                                    ).to(self.device)
        sigmas = (diffusion.grid(self.config.steps, self.config.shift) if self.config.sampler == "euler"
                  else diffusion.step_list(self.config.steps, self.config.shift))
        sample = samplers.euler if self.config.sampler == "euler" else samplers.few_step
        b, c0, total = len(ctx), hist.shape[1], actions.shape[1]
        frames, t = [], 0
        self.last_chunk_ms = []
        while t < total:
            t0 = time.perf_counter()
            n = min(self.new, total - t)
            known = hist[:, -self.context:]
            k = known.shape[1]
            end = c0 + t + n
            acts = all_acts[:, end - n - k:end]
            # drawn for a context teacher too (unused there): both layouts keep one noise stream
            eps = torch.randn(known.shape, generator=g, device=self.device)
            noise = torch.randn((b, n, *shape), generator=g, device=self.device)
            x0 = sample(self._denoiser(known, eps, acts), noise, sigmas, generator=g).float()
            hist = torch.cat([hist, x0], dim=1)[:, -self.context:]
            frames.append(self.tokenizer.decode(x0).cpu().numpy())
            ms = (time.perf_counter() - t0) * 1e3
            self.last_chunk_ms.append(ms)
            if on_frame is not None:
                for j in range(n):
                    on_frame(t + j, ms / 1e3 / n)
            t += n
        return np.concatenate(frames, axis=1)

    def first_frame_ms(self) -> float:
        """A first window needs real frames; its cost is that of any window (all frames at once)."""
        return float(self.last_chunk_ms[0]) if self.last_chunk_ms else float("nan")


def make_rollout(world: World, config: EngineConfig, protocol: str = "auto") -> EngineRollout | JointRollout:
    return (JointRollout if pick_protocol(world, protocol) == "joint" else EngineRollout)(world, config)
