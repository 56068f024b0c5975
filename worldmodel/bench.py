"""Inference benchmark: first-frame latency, per-frame latency and FPS by step count and block size.

    python -m worldmodel.bench [--json] [--model small] [--tokenizer small|fine] [--threads N]
        [--compile] [--backend eager|ort] [--dtype auto] [--profile]

Random weights at a named size (speed does not depend on the values). Each configuration runs
the real ``Engine``: a frame costs K denoising calls + decode + the clean-cache refresh, all
timed (the refresh is included even though the engine can hide it in idle time); ``*_fused``
configurations leave the refresh to ride along the next frame's first call, as uncapped play
does (``worldmodel/fused_refresh.py``). Steady-state
numbers are taken with a full cache (window + sink frames). Beside each time the compute floor
is printed: FLOPs counted by ``torch.utils.flop_counter`` divided by a measured matmul rate,
the ratio of the frame time to it, and the tensor ops (aten calls) one frame dispatches: at this
model size a frame's cost is mostly per-op overhead, so the op count is the number to cut.
``--tokenizer fine`` (16x16 latents) gives the same DiT 64 patch tokens per frame, 4x small's
(``--patch 4``: 16 again, as the ``fine`` model config trains it).
``--profile`` prints torch.profiler's table of one steady-state frame's ops.
``--backend ort`` runs the DiT's steady-state calls as ONNX Runtime graphs in float32
(``worldmodel/ort_backend.py``). ORT runs out of torch's sight, so its FLOPs are counted on the
eager float32 path (the same maths), its ops are the tensor ops left in Python, and its floor
uses the float32 matmul rate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from worldmodel.checkpoint import World
from worldmodel.dit import DIT_SIZES, build_dit
from worldmodel.engine import BACKENDS, Engine, EngineConfig, auto_dtype
from worldmodel.tokenizer import TOKENIZER_SIZES, Tokenizer, tokenizer_config

CONFIGS = {  # name -> (denoising steps, frames per block, refresh fused into the next call)
    "framewise_1step": (1, 1, False),
    "framewise_2step": (2, 1, False),
    "framewise_4step": (4, 1, False),
    "chunkwise_4step": (4, 3, False),
    "framewise_1step_fused": (1, 1, True),
    "framewise_2step_fused": (2, 1, True),
    "chunkwise_4step_fused": (4, 3, True),
}


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's FLOP counter has no formula for SDPA's CPU kernel, so attention on the SDPA path (float32,
# and calls with many queries in bf16) counted zero FLOPs and the floor came out too low
CPU_SDPA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside it (views and in-place ops included)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def random_world(size: str, frames_per_block: int, train_frames: int = 16, num_actions: int = 8,
                 tokenizer: str = "small", patch: int | None = None) -> World:
    tok = Tokenizer(tokenizer_config(tokenizer))
    extra = {} if patch is None else {"patch": patch}
    dit = build_dit(size, latent_size=tok.config.latent_size, latent_channels=tok.config.latent_channels,
                    num_actions=num_actions, frames_per_block=frames_per_block,
                    train_frames=train_frames, max_frames=max(64, train_frames), **extra)
    return World(dit=dit, tokenizer=tok, action_names=[f"a{i}" for i in range(num_actions)])


def matmul_rate(width: int, dtype: torch.dtype, tokens: int = 64, reps: int = 50, rounds: int = 7) -> float:
    """Measured GFLOP/s of a transformer-shaped matmul (tokens x W) @ (W x 4W): the best of
    ``rounds`` timings (one round is well under a millisecond, so a single interruption by
    another process would otherwise read as a 10x slower machine)."""
    a, b = torch.randn(tokens, width, dtype=dtype), torch.randn(width, 4 * width, dtype=dtype)
    for _ in range(5):
        a @ b
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * tokens * width * 4 * width * reps / best / 1e9


def one_frame(eng: Engine, block: int) -> None:
    """One steady-state frame: its calls and its refresh (a whole block for chunk-wise)."""
    eng.step(0)
    eng.flush()
    for _ in range(block - 1):
        eng.step(0)


def bench_config(size: str, steps: int, block: int, fused: bool, dtype: str, compile_: bool,
                 frames: int, train_frames: int, tokenizer: str = "small", profile: bool = False,
                 patch: int | None = None, backend: str = "eager") -> dict:
    world = random_world(size, block, train_frames, tokenizer=tokenizer, patch=patch)
    eng = Engine(world, EngineConfig(steps=steps, first_frame_steps=4, dtype=dtype, compile=compile_,
                                     sink=block, seed=0, fuse_refresh=fused, backend=backend))
    if compile_:  # warm the compiled graphs (cold compile is not a latency a player sees twice)
        eng.reset(None)
        for _ in range(eng.cache.slots + 2):
            eng.step(0)
    t = time.perf_counter()
    eng.reset(None)  # first block from noise, 4-step list, decode included
    first_ms = (time.perf_counter() - t) * 1e3
    eng.flush()
    while min(eng.cache.counts) < eng.cache.slots:  # fill the cache: steady state
        eng.step(0)
        eng.flush()
    times = []
    for i in range(frames):
        t = time.perf_counter()
        eng.step(i % world.dit.cfg.num_actions)  # fused: includes the previous frame's refresh
        if not fused:
            eng.flush()  # the refresh is part of every frame's cost
        times.append((time.perf_counter() - t) * 1e3)
    # chunk-wise: block cost is spread over its frames; average whole blocks
    n = len(times) - len(times) % block
    frame_ms = statistics.fmean(times[:n]) if block > 1 else statistics.median(times)
    eng.flush()
    eager = eng.model.eager_only() if backend == "ort" else contextlib.nullcontext()
    with eager, FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as fc:
        one_frame(eng, block)
    flops = fc.get_total_flops() / block
    with OpCounter() as oc:
        one_frame(eng, block)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            one_frame(eng, block)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return {"first_frame_ms": round(first_ms, 2), "frame_ms": round(frame_ms, 2),
            "fps": round(1e3 / frame_ms, 1), "flops_per_frame": int(flops), "ops_per_frame": oc.ops // block,
            "tokens_per_frame": world.dit.cfg.tokens_per_frame,
            "dtype": str(eng.dit.patch_in.weight.dtype).removeprefix("torch.")}  # the DiT's


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m worldmodel.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small", choices=sorted(DIT_SIZES))
    p.add_argument("--tokenizer", default="small", choices=sorted(TOKENIZER_SIZES),
                   help="latent grid: fine = 16x16 latents, 4x the tokens per frame")
    p.add_argument("--patch", type=int, default=None,
                   help="DiT patch side in latents (default: the size's; fine + 2 = 64 tokens, fine + 4 = 16)")
    p.add_argument("--profile", action="store_true", help="print the op profile of one frame per config")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="torch.compile the dense parts")
    p.add_argument("--backend", default="eager", choices=[b for b in BACKENDS if b != "auto"],  # say which
                   help="eager (PyTorch) or ort (the DiT's steady-state calls in ONNX Runtime, float32)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--frames", type=int, default=60, help="timed steady-state frames per config")
    p.add_argument("--train-frames", type=int, default=16, help="clip length: sets the cache size")
    p.add_argument("--only", nargs="*", choices=sorted(CONFIGS), help="run only these configs")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = auto_dtype("cpu") if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.backend == "ort":  # the DiT runs float32 there (an explicit bfloat16 is refused below)
        dtype = torch.float32 if args.dtype == "auto" else dtype
    width = DIT_SIZES[args.model]["width"]
    rate = matmul_rate(width, dtype)
    out: dict = {"model": args.model, "tokenizer": args.tokenizer, "threads": torch.get_num_threads(),
                 "compile": args.compile, "backend": args.backend,
                 "dtype": str(dtype).removeprefix("torch."), "matmul_gflops": round(rate, 1)}
    for name in args.only or CONFIGS:
        steps, block, fused = CONFIGS[name]
        r = bench_config(args.model, steps, block, fused, args.dtype, args.compile, args.frames,
                         args.train_frames, args.tokenizer, args.profile, args.patch, args.backend)
        r["floor_ms"] = round(r["flops_per_frame"] / rate / 1e6, 2)
        r["floor_ratio"] = round(r["frame_ms"] / r["floor_ms"], 2)
        out[name] = r
        if not args.json:
            print(f"{name:22s} first frame {r['first_frame_ms']:7.1f} ms | frame {r['frame_ms']:6.2f} ms "
                  f"({r['fps']:5.1f} FPS) | {r['flops_per_frame'] / 1e9:5.2f} GFLOP/frame, "
                  f"floor {r['floor_ms']:5.2f} ms (x{r['floor_ratio']:.1f}) | {r['ops_per_frame']} ops",
                  flush=True)
    names = args.only or list(CONFIGS)
    out["flops_per_frame"] = out[names[0]]["flops_per_frame"]
    out["tokens_per_frame"] = out[names[0]]["tokens_per_frame"]
    if "framewise_2step" in out and "chunkwise_4step" in out:  # the paper's first-frame comparison
        out["first_frame_ratio"] = round(out["framewise_2step"]["first_frame_ms"]
                                         / out["chunkwise_4step"]["first_frame_ms"], 2)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{out['tokens_per_frame']} tokens per frame; matmul {out['matmul_gflops']} GFLOP/s "
              f"({out['dtype']}, {out['threads']} threads, backend {out['backend']}), peak RSS {out['peak_rss_mb']} MB"
              + (f"; first frame frame-wise 2-step / chunk-wise 4-step {out['first_frame_ratio']}"
                 if "first_frame_ratio" in out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
