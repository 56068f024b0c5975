"""ONNX Runtime backend: the DiT's dense per-call maths as static-shape graphs, bookkeeping in Python.

Why: on a CPU a steady-state frame of the small model dispatches thousands of tensor ops, most of
them a few microseconds of work behind several microseconds of dispatch. ONNX Runtime runs the
same maths as one graph (fused LayerNorm/GELU/attention-score kernels, no per-op Python or
dispatcher): the model calls take about half the time on one thread (docs: ``worldmodel.bench
--backend ort``).

The cut: a graph is a pure function of the noisy block (or the clean block being refreshed), its
noise level and actions, every layer's cached K and V, and the frame positions of the queries and
the cached keys (the RoPE tables are gathered inside the graph from those positions). It returns
the velocity and, where the call writes the cache, the new block's K/V of every layer. The KV
cache's slots, ring and re-based positions stay exactly as ``kv_cache.py`` keeps them, in Python;
the returned K/V are written with ``KVCache.write`` as the eager path does.

Three graphs, the calls the play loop makes: ``forward_cached`` (a denoising call), ``refresh``
(write a clean block) and ``fused_refresh.refresh_and_forward`` (both in one call). Only the
steady state runs in ONNX Runtime: every world's ring full (worlds may be at different frames, as
after a vector env's autoreset: positions are per world). Before that (the cache filling after a
reset from noise, a several-block context seed) the call runs the eager PyTorch code, which gives
the same numbers. Why not a graph per fill level: the cache fills once per reset, at most ``sink +
window`` frames (play, ``Engine.warm_up`` and env resets seed a full context, so they start in the
steady state), while a graph costs a second or more to export and tens of MB to hold, three of
them per fill level.

Precision: graphs run in float32 (ONNX Runtime 1.32's CPU provider has no bf16 MatMul kernel and
its fp16 one is no faster than fp32), so the DiT and its cache are float32 under this backend; the
engine keeps the tokenizer at its dtype.
The graphs hold a copy of the weights taken at export: build a new ``OrtDiT`` after changing them.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from contextlib import contextmanager

import torch
from torch.onnx import symbolic_helper

from worldmodel.attention import attend
from worldmodel.dit import Block, DiT
from worldmodel.fused_refresh import refresh_and_forward
from worldmodel.kv_cache import CacheLayout, KVCache

INSTALL_HINT = "pip install -e .[ort]"
OPSET = 17


def import_ort():
    """onnxruntime (and onnx, which the exporter needs), or an ImportError naming the fix."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as err:
        raise ImportError(f"backend='ort' needs onnxruntime and onnx ({err}); install them with "
                          f"`{INSTALL_HINT}`, or use backend='eager'") from err
    return onnxruntime


def check_placement(device: torch.device | str, dtype: torch.dtype) -> None:
    """ValueError unless the graphs can run where the engine asks (CPU, float32)."""
    if torch.device(device).type != "cpu":
        raise ValueError(f"ort backend runs on cpu only; use backend=eager (device is {device!s})")
    if dtype != torch.float32:
        raise ValueError(f"ort backend runs the DiT in float32 (ONNX Runtime's CPU provider has no "
                         f"bf16 matmul), got dtype {dtype}; use dtype='auto' or 'float32', or "
                         "backend=eager")


@symbolic_helper.parse_args("v", "is", "v", "f")
def _rms_norm(g, x, shape, weight, eps):
    # The TorchScript exporter has no rule for aten::rms_norm before ONNX opset 23. ONNX Runtime's
    # SimplifiedLayerNormalization (default domain) is exactly RMSNorm over the last axis, in fp32.
    return g.op("SimplifiedLayerNormalization", x, weight, axis_i=-1, epsilon_f=eps, stash_type_i=1)


class _Graph(torch.nn.Module):
    """One steady-state call's dense maths over tensors only; ``kind`` is "forward", "refresh" or
    "fused". Mirrors ``DiT._cached`` (forward, refresh) with the cache's reads replaced by the
    ``ck``/``cv`` inputs and its writes by outputs; "fused" is both in one pass, see below."""

    def __init__(self, dit: DiT, kind: str) -> None:
        super().__init__()
        self.dit, self.kind = dit, kind

    def forward(self, *inputs: torch.Tensor):
        dit, rope = self.dit, self.dit.rope
        cfg = dit.cfg
        p, k = cfg.tokens_per_frame, cfg.frames_per_block
        if self.kind == "fused":
            x0, actions0, x, sigma, actions, ck, cv, qpos, kpos, kpos_next, written = inputs
            tokens, cond = dit.embed(torch.cat([x0, x], 1), torch.cat([torch.zeros_like(sigma), sigma], 1),
                                     torch.cat([actions0, actions], 1))
            ktables_next = rope.time_tables(kpos_next, p)
        else:
            x, sigma, actions, ck, cv, qpos, kpos = inputs
            tokens, cond = dit.embed(x, sigma, actions)
        qtables, ktables = rope.tables(qpos, p), rope.time_tables(kpos, p)
        ks, vs = [], []
        for layer, (blk, mods) in enumerate(zip(dit.blocks, dit.modulations(cond))):
            # the class's methods, not the instance's: with EngineConfig.compile the instance
            # holds torch.compile wrappers, which the exporter cannot trace
            q, kq, k_new, v_new = Block.pre(blk, tokens, mods, rope, qtables, store=self.kind != "forward")
            if self.kind != "fused":
                keys = torch.cat([rope.rotate_time(ck[layer], *ktables), kq], 2)
                o = attend(q, keys, torch.cat([cv[layer], v_new], 2), None, cfg.attention_backend)
                ks.append(k_new)
                vs.append(v_new)
            else:
                # Exactly refresh(t) then forward_cached(t+1), as two attentions in one graph: the
                # refresh queries see [cache | block t] at the cache's positions now; the next
                # block's see [cache after the write | block t+1] at its positions then, where the
                # written slots hold block t's K/V. Same keys as fused_refresh.refresh_and_forward,
                # whose single masked attention costs twice the scores.
                ka, va, kb, vb = k_new[:, :, :k * p], v_new[:, :, :k * p], k_new[:, :, k * p:], v_new[:, :, k * p:]
                reps = ck.shape[3] // (k * p)  # whole blocks of slots; the written ones are one of them
                ck2 = torch.where(written, ka.repeat(1, 1, reps, 1), ck[layer])
                cv2 = torch.where(written, va.repeat(1, 1, reps, 1), cv[layer])
                o_a = attend(q[:, :, :k * p], rope.rotate_time(torch.cat([ck[layer], ka], 2), *ktables),
                             torch.cat([cv[layer], va], 2), None, cfg.attention_backend)
                o_b = attend(q[:, :, k * p:], rope.rotate_time(torch.cat([ck2, kb], 2), *ktables_next),
                             torch.cat([cv2, vb], 2), None, cfg.attention_backend)
                o = torch.cat([o_a, o_b], 2)
                ks.append(ka)
                vs.append(va)
            tokens = Block.post(blk, tokens, o, mods)
        if self.kind == "refresh":  # the last block's post and the head are dead: ORT drops them
            return torch.stack(ks), torch.stack(vs)
        if self.kind == "forward":
            return dit.unembed(tokens, cond)
        return dit.unembed(tokens[:, k:], cond[:, k:]), torch.stack(ks), torch.stack(vs)


_NAMES = {
    "forward": (["x", "sigma", "actions", "ck", "cv", "qpos", "kpos"], ["velocity"]),
    "refresh": (["x", "sigma", "actions", "ck", "cv", "qpos", "kpos"], ["k_new", "v_new"]),
    "fused": (["x0", "actions0", "x", "sigma", "actions", "ck", "cv", "qpos", "kpos", "kpos_next", "written"],
              ["velocity", "k_new", "v_new"]),
}


class OrtDiT:
    """A DiT's cached calls (``forward_cached``, ``refresh``, ``refresh_and_forward``, same
    signatures and results as the eager ones) run by ONNX Runtime in the steady state, for a cache
    of ``batch`` worlds x ``slots`` frames (``DiT.new_cache``'s). Exports every graph and opens it
    once here, so a failure shows when the engine is built, not mid-play."""

    def __init__(self, dit: DiT, batch: int, slots: int) -> None:
        self.ort = import_ort()
        ref = dit.patch_in.weight
        check_placement(ref.device, ref.dtype)
        self.dit, self.batch, self.slots = dit, batch, slots
        self.enabled = True  # False: every call runs eager (``eager_only``)
        self.runs: Counter[str] = Counter()  # graph runs per kind (the rest ran eager)
        self._sessions: dict[tuple[str, int], object] = {}
        self._onnx = {kind: self._export(kind) for kind in _NAMES}
        for kind in _NAMES:
            self._session(kind)

    # ---- export -------------------------------------------------------------------------------
    def _example(self, kind: str) -> tuple[torch.Tensor, ...]:
        cfg, b = self.dit.cfg, self.batch
        k, n = cfg.frames_per_block, self.slots
        x = torch.zeros(b, k, cfg.latent_size, cfg.latent_size, cfg.latent_channels)
        sigma, actions = torch.zeros(b, k), torch.zeros(b, k, dtype=torch.long)
        kv = torch.zeros(cfg.depth, b, cfg.heads, n * cfg.tokens_per_frame, cfg.head_dim)
        qpos = torch.arange(n, n + k).expand(b, k)
        if kind != "fused":
            return x, sigma, actions, kv, kv, qpos, torch.arange(n).expand(b, n)
        kpos = torch.arange(n + k).expand(b, n + k)
        written = self._written([[n - k + j for j in range(k)]] * b)
        return x, actions, x, sigma, actions, kv, kv, torch.cat([qpos, qpos], 1), kpos, kpos, written

    def _export(self, kind: str) -> bytes:
        inputs, outputs = _NAMES[kind]
        buf = io.BytesIO()
        torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm, OPSET)
        try:
            with torch.no_grad(), warnings.catch_warnings():
                # tracer notes on Python-side range checks (rope positions) that the graph need not keep
                warnings.simplefilter("ignore")
                torch.onnx.export(_Graph(self.dit, kind), self._example(kind), buf, dynamo=False,
                                  opset_version=OPSET, input_names=inputs, output_names=outputs,
                                  do_constant_folding=True)
        except Exception as err:  # an exporter gap (new op, new torch): say so and how to go on
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise RuntimeError(f"ONNX export of the DiT's {kind} call failed ({type(err).__name__}: "
                               f"{first}); use backend='eager'") from err
        return buf.getvalue()

    def _session(self, kind: str):
        """The session for ``kind`` at torch's current thread count (play picks threads by timing
        frames at each count, so ORT follows torch rather than fixing its own at export)."""
        threads = torch.get_num_threads()
        key = (kind, threads)
        if key not in self._sessions:
            so = self.ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
            so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # no busy-waiting between ops: beside another busy process a spinning pool thread
            # takes the core the caller needs (threads.py has the measurements for torch's pool)
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            try:
                self._sessions[key] = self.ort.InferenceSession(self._onnx[kind], so,
                                                                providers=["CPUExecutionProvider"])
            except Exception as err:
                raise RuntimeError(f"ONNX Runtime cannot load the DiT's {kind} graph ({err}); use "
                                   "backend='eager'") from err
        return self._sessions[key]

    def _run(self, kind: str, *inputs: torch.Tensor) -> list[torch.Tensor]:
        feed = {name: t.contiguous().numpy() for name, t in zip(_NAMES[kind][0], inputs)}
        self.runs[kind] += 1
        return [torch.from_numpy(a) for a in self._session(kind).run(None, feed)]

    # ---- when a graph applies -----------------------------------------------------------------
    def _steady(self, cache: KVCache, *blocks: torch.Tensor) -> bool:
        """Every world's ring full, one block per input, no autograd: the shapes the graphs were
        exported for. Anything else runs eager."""
        k = self.dit.cfg.frames_per_block
        return (self.enabled and not torch.is_grad_enabled() and cache.batch == self.batch
                and cache.slots == self.slots and min(cache.counts) >= cache.slots
                and all(b.shape[1] == k for b in blocks)
                and all(c % k == 0 for c in cache.counts))  # whole blocks: "fused" tiles block t

    def _positions(self, lay: CacheLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """The layout's query and slot positions per world, (B, k) and (B, slots): worlds at one
        frame share them (eager broadcasts the same tables, so the numbers agree)."""
        b = self.batch
        return lay.query_positions.expand(b, -1), lay.slot_positions.expand(b, -1)

    @contextmanager
    def eager_only(self):
        """Every call inside runs the eager code (e.g. to count its FLOPs, which ORT hides)."""
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before

    def _write(self, cache: KVCache, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        for layer in range(k_new.shape[0]):
            cache.write(layer, k_new[layer], v_new[layer])
        cache.advance(self.dit.cfg.frames_per_block)

    def _written(self, slots: list[list[int]]) -> torch.Tensor:
        """(B, 1, slots * P, 1) bool: the tokens of each world's ``slots`` (the block being written).
        Built per call (a few small ops): worlds of a vector env reset at different frames, so a
        memo keyed by their slots would grow with every autoreset."""
        mask = torch.zeros(len(slots), self.slots, dtype=torch.bool)
        for w, s in enumerate(slots):
            mask[w, s] = True
        return mask.repeat_interleave(self.dit.cfg.tokens_per_frame, 1)[:, None, :, None].contiguous()

    # ---- the calls ----------------------------------------------------------------------------
    def forward_cached(self, x: torch.Tensor, sigma: torch.Tensor, actions: torch.Tensor,
                       cache: KVCache) -> torch.Tensor:
        """``DiT.forward_cached``."""
        if not self._steady(cache, x):
            return self.dit.forward_cached(x, sigma, actions, cache)
        qpos, kpos = self._positions(cache.layout(x.shape[1]))
        return self._run("forward", x, sigma.float(), actions, cache.k, cache.v, qpos, kpos)[0]

    @torch.no_grad()
    def refresh(self, x0: torch.Tensor, actions: torch.Tensor, cache: KVCache) -> None:
        """``DiT.refresh``."""
        if not self._steady(cache, x0):
            return self.dit.refresh(x0, actions, cache)
        qpos, kpos = self._positions(cache.layout(x0.shape[1]))
        sigma = torch.zeros(x0.shape[:2])
        self._write(cache, *self._run("refresh", x0, sigma, actions, cache.k, cache.v, qpos, kpos))

    @torch.no_grad()
    def refresh_and_forward(self, x0: torch.Tensor, actions0: torch.Tensor, x: torch.Tensor,
                            sigma: torch.Tensor, actions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """``fused_refresh.refresh_and_forward``."""
        if not self._steady(cache, x0, x):
            return refresh_and_forward(self.dit, x0, actions0, x, sigma, actions, cache)
        k = self.dit.cfg.frames_per_block
        q1, k1 = self._positions(cache.layout(k))                   # what the refresh would see
        q2, k2 = self._positions(cache.peek_advance(k).layout(k))   # what the next call would see
        written = [[cache.slot_of(cache.counts[w] + j) for j in range(k)] for w in range(self.batch)]
        v, k_new, v_new = self._run("fused", x0, actions0, x, sigma.float(), actions, cache.k, cache.v,
                                    torch.cat([q1, q2], 1), torch.cat([k1, q1], 1), torch.cat([k2, q2], 1),
                                    self._written(written))
        self._write(cache, k_new, v_new)
        return v
