"""The frame-by-frame engine: action in, frame out, over a rolling KV cache of past frames.

One ``step(actions)`` call (docs/design.md, "Inference"): fresh noise for the next frame -> the few-step
sampler (1, 2 or 4 model calls against the cache; the 4-step first-frame list when the cache is
empty) -> decode -> uint8 frame returned at once. The clean-cache refresh of that frame (one more
call at sigma = 0) is left *pending* and runs at the start of the next step, or earlier when the
caller has idle time (``flush()``, e.g. while a play loop waits for its next tick), so it is off
the key-to-frame path. When it is still pending at the next step, it runs fused with that step's
first model call (``fused_refresh.py``: one call with twice the queries instead of two calls, the
same numbers): uncapped 2-step play then costs two model calls per frame instead of three.

Chunk-wise models (``frames_per_block = k > 1``) generate k frames per block from the action
given at the block's first frame; the next k-1 steps return the buffered frames (their actions
cannot change them — that coarser control is what the chunk-wise baseline costs).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import numpy as np
import torch

from worldmodel import diffusion, samplers
from worldmodel.checkpoint import World, load_world
from worldmodel.context import prepare_context
from worldmodel.fused_refresh import refresh_and_forward

BACKENDS = ("eager", "ort", "auto")


class InvalidAction(ValueError):
    """An action that is not one of the world's ids (or not one per world)."""


def auto_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 where the hardware has bf16 matrix units (CUDA, or CPUs oneDNN runs bf16 on), else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


@dataclass
class EngineConfig:
    """Run-time settings; a world checkpoint's ``engine`` entry provides the defaults."""

    steps: int = 2                 # denoising steps per frame (few-step sampler: 1, 2 or 4)
    first_frame_steps: int = 4     # steps for a block generated with an empty cache
    sampler: str = "few_step"      # "few_step" (distilled students) or "euler" (teachers)
    cfg_scale: float = 1.0         # action guidance, standard form; 1 = off (euler only)
    shift: float = diffusion.DEFAULT_SHIFT
    window: int | None = None      # cached frames besides sinks; None = as many as training allows
    sink: int = 1
    device: str = "cpu"
    dtype: str = "auto"            # "auto", "float32" or "bfloat16"
    compile: bool = False
    fuse_refresh: bool = True      # a pending refresh rides along the next frame's first call
    seed: int | None = None
    # "eager" (PyTorch) or "ort": the DiT's steady-state calls as ONNX Runtime graphs (CPU; the
    # DiT in float32, "auto" dtype still applies to the tokenizer; worldmodel/ort_backend.py);
    # "auto": ort where it can run (CPU, dtype auto, onnxruntime installed), else eager
    backend: str = "eager"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {list(BACKENDS)}")

    @classmethod
    def from_dict(cls, d: dict) -> "EngineConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown engine setting(s) {unknown}; valid ones: {sorted(names)}")
        return cls(**d)


class Engine:
    """Batched world-model runtime for ``batch`` worlds; see the module docstring."""

    def __init__(self, world: World, config: EngineConfig | None = None, batch: int = 1) -> None:
        self.config = cfg = config or EngineConfig.from_dict(world.engine)
        self.device = torch.device(cfg.device)
        self.dtype = auto_dtype(self.device) if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        self.world = world
        ort = cfg.backend == "ort" or (cfg.backend == "auto" and self._ort_usable(cfg))
        self.backend = "ort" if ort else "eager"
        if ort:  # placement errors first: they name the fix before anything is exported
            from worldmodel.ort_backend import check_placement

            check_placement(self.device, torch.float32 if cfg.dtype == "auto" else self.dtype)
        self.dit = world.dit.to(self.device, torch.float32 if ort else self.dtype).eval()
        self.tokenizer = world.tokenizer.to(self.device, self.dtype).eval()  # statistics stay fp32
        self.reward = world.reward.to(self.device, self.dtype).eval() if world.reward else None
        if cfg.compile:
            self.dit.compile_blocks()
            self.tokenizer.decoder = torch.compile(self.tokenizer.decoder, dynamic=False)
        self.batch = batch
        self.block = self.dit.cfg.frames_per_block
        sink = -(-cfg.sink // self.block) * self.block  # whole blocks: round sinks up
        window = cfg.window
        if window is None:  # the largest window whose positions stay inside the training clips
            window = self.dit.cfg.train_frames - sink - self.block
            window -= window % self.block
            if window < self.block and sink:  # short clips, big blocks: a past block beats a sink
                sink = 0
                window = self.dit.cfg.train_frames - self.block
                window -= window % self.block
        self.cache = self.dit.new_cache(batch, window=window, sink=sink)
        # what runs the cached model calls: the DiT itself, or ONNX Runtime graphs of them with
        # the same signatures and numbers (eager where the graphs do not apply)
        self.model = self.dit
        self._fused = partial(refresh_and_forward, self.dit)
        if ort:
            from worldmodel.ort_backend import OrtDiT

            self.model = OrtDiT(self.dit, batch, self.cache.slots)
            self._fused = self.model.refresh_and_forward
        self.steps = cfg.steps
        self.first_frame_steps = cfg.first_frame_steps
        self.generator = torch.Generator(self.device)
        self.generator.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (x0, actions) to refresh
        self._buffer: list[tuple[np.ndarray, torch.Tensor]] = []  # chunk-wise: frames to come
        self.frames: np.ndarray | None = None   # (B, H, W, 3) the frame each world shows now
        self.latents: torch.Tensor | None = None  # (B, h, w, c) its latents
        # the reward heads' verdict on the last step's transitions, (B,) float64 and bool
        self.rewards: np.ndarray | None = None
        self.terminated: np.ndarray | None = None
        self.frame_index = 0
        self.timing: dict[str, float] = {}
        self.refresh_cost_ms: float | None = None  # last stand-alone refresh (warm_up measures one)

    @staticmethod
    def _ort_usable(cfg: EngineConfig) -> bool:
        """backend="auto": ONNX Runtime where it can run (a CPU engine at dtype auto, the package
        installed); it makes the small model's frames ~1.4x faster on a CPU (worldmodel.bench)."""
        import importlib.util

        return (torch.device(cfg.device).type == "cpu" and cfg.dtype in ("auto", "float32")
                and all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx")))

    @classmethod
    def load(cls, path: str | Path, batch: int = 1, **overrides) -> "Engine":
        """Load a world checkpoint; ``overrides`` replace its engine defaults."""
        world = load_world(path)
        return cls(world, EngineConfig.from_dict({**world.engine, **overrides}), batch=batch)

    # ---- properties ---------------------------------------------------------------------------
    @property
    def action_names(self) -> list[str]:
        return self.world.action_names

    @property
    def num_actions(self) -> int:
        return len(self.world.action_names)

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return self.tokenizer.config.frame_shape

    @property
    def steps(self) -> int:
        return self._steps

    @steps.setter
    def steps(self, value: int) -> None:
        """Change the step count; takes effect at the next generated frame."""
        if self.config.sampler == "few_step" and value not in diffusion.STEP_COUNTS:
            raise ValueError(f"steps must be one of {diffusion.STEP_COUNTS}, got {value}")
        if value < 1:
            raise ValueError(f"steps must be >= 1, got {value}")
        self._steps = int(value)

    @property
    def latency_ms(self) -> float:
        """Model time of the last frame: pending refresh (if not flushed) + denoise + decode."""
        return float(self.timing.get("total_ms", 0.0))

    # ---- public API ---------------------------------------------------------------------------
    @torch.no_grad()
    def reset(self, context=None, actions=None, *, seed: int | None = None,
              worlds: list[int] | None = None) -> np.ndarray:
        """Start worlds over; returns every world's current frame, uint8 (B, H, W, 3).

        ``context``: None (first frame from noise, first-frame step list), real frames uint8
        (T, H, W, 3) shared by all worlds or (B, T, H, W, 3) per world (any size: resized; only
        the newest frames the KV cache holds are used), or the path of an image file.
        ``actions`` (T,) / (B, T): the actions that led to those frames (default: unknown, -1).
        ``worlds``: reset only these batch rows (default all); the model then runs on those rows
        alone, the others keep playing untouched.
        """
        if seed is not None:
            self.generator.manual_seed(seed)
        self._pending_flush()
        ctx, acts = self._context(context, actions)
        if worlds is None:
            self.cache.reset()
            self._buffer, self.frame_index = [], 0
            if ctx is None:
                frames, self.latents = self._generate(torch.full((self.batch,), -1, dtype=torch.long))
            else:
                frames, self.latents = self._seed_context(self.cache, ctx, acts)
            self.frames = frames
            return frames
        if self.block > 1:
            raise ValueError("a chunk-wise world resets all its batch at once (per-world reset would "
                             "desynchronise the blocks); call reset() without worlds=")
        for j in worlds:
            with self.cache.row(j) as cache:
                cache.reset()
                if ctx is None:
                    null = torch.full((1, 1), -1, dtype=torch.long, device=self.device)
                    x0 = self._sample_block(cache, null, first=True)
                    self.model.refresh(x0, null, cache)
                    frame, latent = self.tokenizer.decode(x0).cpu().numpy()[:, 0], x0[:, -1]
                else:
                    frame, latent = self._seed_context(cache, ctx[j:j + 1], acts[j:j + 1])
            self.frames[j], self.latents[j] = frame[0], latent[0]
        return self.frames.copy()

    @contextmanager
    def _throwaway(self):
        """Frames made inside are forgotten: a blank context first, then the cache, the RNG and
        the shown frame as they were before (so results do not change)."""
        state = self.generator.get_state()
        h, w, _ = self.frame_shape
        self.reset(np.zeros((self.cache.slots - self.cache.slots % self.block, h, w, 3), np.uint8))
        try:
            yield
        finally:
            self.flush()
            self.cache.reset()
            self.generator.set_state(state)
            self._buffer, self.frames, self.latents, self.frame_index, self.timing = [], None, None, 0, {}

    @torch.no_grad()
    def warm_up(self) -> None:
        """Make two throw-away blocks (context seed, denoise, decode, a refresh fused into the
        next block's first call when ``fuse_refresh``, a stand-alone one whose cost ``flush``
        budgets with) and forget them, so one-time costs (allocations, kernel selection: the
        first model call is ~2x slower; with ``compile``, each call shape's graph) are paid
        while loading, not by the first frames a player sees. The next ``reset`` starts from
        nothing, so results do not change."""
        with self._throwaway():
            for _ in range(self.block + 1):  # the second block's first call carries the first's refresh
                self.step(0)

    @torch.no_grad()
    def time_frames(self, frames: int = 6) -> list[float]:
        """Wall seconds of ``frames`` throw-away steady-state frames, each with its refresh (as
        ``warm_up``, nothing is kept). For choosing threads."""
        out = []
        with self._throwaway():
            for _ in range(frames):
                t = time.perf_counter()
                self.step(0)
                self.flush()
                out.append(time.perf_counter() - t)
        return out

    @torch.no_grad()
    def step(self, actions) -> np.ndarray:
        """Advance every world by one frame under ``actions`` (int or (B,)); uint8 (B, H, W, 3).

        With reward heads, ``rewards`` (B,) and ``terminated`` (B,) then hold their verdict on the
        transition just made (from the latents before and after it, under ``actions``)."""
        acts = self.check_actions(actions)
        prev = self.latents
        self.frame_index += 1
        if self._buffer:  # chunk-wise: frames of the current block are already made
            self.timing = {"total_ms": 0.0, "steps": 0}
            self.frames, self.latents = self._buffer.pop(0)
        else:
            self.frames, self.latents = self._generate(acts)
        if self.reward is not None and prev is not None:
            r, t = self.reward.predict(prev, self.latents, acts.to(prev.device))
            self.rewards, self.terminated = r.cpu().numpy().astype(np.float64), t.cpu().numpy()
        return self.frames

    def flush(self, budget_ms: float | None = None) -> bool:
        """Run the pending clean-cache refresh now (call it while idle, e.g. waiting for a tick).

        ``budget_ms``: the idle time there is; the refresh runs only if its last measured cost
        fits, otherwise it stays pending and rides along the next frame's first call (fused), so
        it never delays a frame by a whole extra call. Returns whether a refresh ran.
        """
        fits = (budget_ms is None or not self.config.fuse_refresh or self.refresh_cost_ms is None
                or self.refresh_cost_ms <= budget_ms)
        if self._pending is None or not fits:
            return False
        with torch.no_grad():
            self._pending_flush()
        return True

    # ---- internals ----------------------------------------------------------------------------
    def check_actions(self, actions) -> torch.Tensor:
        """``actions`` (an int, or one per world) as a (B,) long tensor; InvalidAction naming the
        problem and the valid ids otherwise. The one place actions are checked and converted."""
        a = np.asarray(actions)
        if a.dtype.kind not in "iu":
            raise InvalidAction(f"actions must be integer ids 0..{self.num_actions - 1} "
                                f"({', '.join(self.action_names)}), got {a.dtype} {actions!r}")
        a = a.astype(np.int64).reshape(-1)
        if a.size == 1 and self.batch > 1:
            a = np.repeat(a, self.batch)
        if a.size != self.batch:
            raise InvalidAction(f"expected {self.batch} actions (one per world), got {a.size}")
        bad = np.flatnonzero((a < 0) | (a >= self.num_actions))
        if bad.size:
            where = f" for world {int(bad[0])}" if self.batch > 1 else ""
            raise InvalidAction(f"invalid action {int(a[bad[0]])}{where}: this world has {self.num_actions} "
                                f"actions, ids 0..{self.num_actions - 1} = {self.action_names}")
        return torch.from_numpy(a)

    def _pending_flush(self) -> float:
        """Run the pending refresh if any; returns its time in ms (0 if there was none)."""
        if self._pending is None:
            return 0.0
        t0 = time.perf_counter()
        x0, acts = self._pending
        self._pending = None
        self.model.refresh(x0, acts, self.cache)
        self.refresh_cost_ms = (time.perf_counter() - t0) * 1e3
        return self.refresh_cost_ms

    def _denoiser(self, acts: torch.Tensor, cache, pending: list | None = None):
        """x0-denoiser for one block against ``cache``, with optional action CFG. ``pending``: a
        list holding the previous block's (x0, actions); the first model call writes it into the
        cache in the same pass (fused refresh) and empties the list."""
        def velocity(x: torch.Tensor, sigma: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
            if pending:
                return self._fused(*pending.pop(), x, sigma, a, cache)
            return self.model.forward_cached(x, sigma, a, cache)

        def cond(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return diffusion.x0_from_velocity(x, velocity(x, sigma, acts), sigma)

        if self.config.cfg_scale == 1.0:
            return cond
        null = torch.full_like(acts, -1)

        def uncond(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return diffusion.x0_from_velocity(x, velocity(x, sigma, null), sigma)

        return samplers.cfg_denoiser(cond, uncond, self.config.cfg_scale)

    def _sigmas(self, first: bool) -> torch.Tensor:
        n = self.first_frame_steps if first else self.steps
        if self.config.sampler == "euler":
            return diffusion.grid(n, self.config.shift)
        return diffusion.step_list(n, self.config.shift)

    def _sample_block(self, cache, acts: torch.Tensor, first: bool, pending: list | None = None) -> torch.Tensor:
        """Latents x0 (b, k, h, w, c) of the next block of every world in ``cache``."""
        cfg = self.dit.cfg
        noise = torch.randn((cache.batch, self.block, cfg.latent_size, cfg.latent_size, cfg.latent_channels),
                            generator=self.generator, device=self.device)
        sample = samplers.euler if self.config.sampler == "euler" else samplers.few_step
        denoise = self._denoiser(acts, cache, pending)
        return sample(denoise, noise, self._sigmas(first), generator=self.generator)

    def _generate(self, acts: torch.Tensor):
        """Make one block for every world; decode; leave its refresh pending."""
        t0 = time.perf_counter()
        fused = self.config.fuse_refresh and self._pending is not None
        pending = [self._pending] if fused else None
        if fused:
            self._pending = None
        refresh_ms = self._pending_flush()  # 0 when fused or when the caller flushed while idle
        t1 = time.perf_counter()
        block_acts = acts.to(self.device)[:, None].repeat(1, self.block)  # (B, k)
        first = all(c == 0 for c in self.cache.counts) and not fused
        x0 = self._sample_block(self.cache, block_acts, first, pending)
        t2 = time.perf_counter()
        frames = self.tokenizer.decode(x0).cpu().numpy()  # (B, k, H, W, 3) uint8
        t3 = time.perf_counter()
        self._pending = (x0, block_acts)
        self.timing = {"refresh_ms": refresh_ms, "denoise_ms": (t2 - t1) * 1e3,
                       "decode_ms": (t3 - t2) * 1e3, "total_ms": (t3 - t0) * 1e3,
                       "steps": self.first_frame_steps if first else self.steps, "fused": fused}
        self._buffer = [(frames[:, j], x0[:, j]) for j in range(1, self.block)]
        return frames[:, 0], x0[:, 0]

    def _context(self, context, actions) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Context frames as uint8 (B, T, H, W, 3) at model size and actions (B, T), or None."""
        return prepare_context(context, actions, self.frame_shape, self.batch, self.cache.slots, self.block)

    def _seed_context(self, cache, ctx: np.ndarray, acts: np.ndarray):
        """Encode real frames (b, T, H, W, 3) and write them into ``cache``; last frame + latents."""
        latents = self.tokenizer.encode(torch.from_numpy(ctx).to(self.device))
        acts_t = torch.from_numpy(acts).to(self.device)
        self.model.refresh(latents, acts_t, cache)  # whole blocks, block-causal, one pass
        return ctx[:, -1].copy(), latents[:, -1]
