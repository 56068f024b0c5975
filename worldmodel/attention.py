"""Attention backend and the block masks that let one set of weights run three ways.

Backends: flash-attn when CUDA, the package and a half-precision input are all present and no
mask is needed (the KV-cache path); PyTorch SDPA otherwise (the CPU flash kernel with a boolean
mask is the fastest CPU option measured). Both compute the same softmax attention.

Masks are built from two per-token labels: the token's block index (frames are grouped into
blocks of ``frames_per_block``) and whether it belongs to the noisy stream. One rule covers the
bidirectional, teacher-forcing and fused-refresh layouts (``block_mask``):

* a query may attend a *clean* key of an *earlier* block;
* a query may attend any key of its *own* block in its *own* stream.

So clean tokens never see noisy ones, noisy tokens see clean context strictly before their block,
and everything inside a block is bidirectional.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

_HAS_FLASH = importlib.util.find_spec("flash_attn") is not None


# Queries per call up to which "auto" uses the matmul path on CPU in bf16: one frame's worth.
# Measured (1 thread, bf16, 65 queries x 1105 keys, 4 heads x 64): SDPA's CPU flash kernel
# 1.63 ms, matmul + fp32 softmax 0.88 ms; at 130 queries SDPA is ahead again (2.4 vs 3.5 ms).
MATMUL_MAX_QUERIES = 96


def attend_matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with the softmax in fp32; same maths as SDPA."""
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           mask: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Softmax attention. q (B, H, Lq, D), k/v (B, H, Lk, D), mask bool broadcastable to
    (B, H, Lq, Lk), True = attend.

    ``backend``: "auto" (flash-attn if usable; on CPU in bf16 with few queries the matmul path;
    else SDPA), "sdpa", "matmul", or "flash" (error if unusable).
    """
    use_flash = (backend in ("auto", "flash") and _HAS_FLASH and q.is_cuda and mask is None
                 and q.dtype in (torch.float16, torch.bfloat16))
    if backend == "flash" and not use_flash:
        raise RuntimeError("flash-attn needs CUDA, the flash-attn package, fp16/bf16 inputs and no "
                           "mask; use backend='sdpa' or 'auto'")
    if use_flash:
        from flash_attn import flash_attn_func  # optional CUDA-only dependency

        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if backend == "matmul" or (backend == "auto" and q.device.type == "cpu" and q.dtype == torch.bfloat16
                               and q.shape[2] <= MATMUL_MAX_QUERIES and not torch.is_grad_enabled()):
        return attend_matmul(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def block_mask(q_block: torch.Tensor, q_noisy: torch.Tensor,
               k_block: torch.Tensor, k_noisy: torch.Tensor) -> torch.Tensor:
    """Boolean (Lq, Lk) mask from per-token block ids and noisy flags (see module docstring)."""
    earlier_clean = (~k_noisy)[None, :] & (k_block[None, :] < q_block[:, None])
    same_block_stream = (k_block[None, :] == q_block[:, None]) & (k_noisy[None, :] == q_noisy[:, None])
    return earlier_clean | same_block_stream


@functools.lru_cache(maxsize=16)
def teacher_forcing_mask(frames: int, tokens_per_frame: int, frames_per_block: int,
                         device: str = "cpu") -> torch.Tensor:
    """Mask for the sequence [clean copy of ``frames`` | noisy copy], (2 F P, 2 F P)."""
    block = torch.arange(frames, device=device).div(frames_per_block, rounding_mode="floor")
    block = block.repeat_interleave(tokens_per_frame)
    blocks = torch.cat([block, block])
    noisy = torch.cat([torch.zeros_like(block, dtype=torch.bool), torch.ones_like(block, dtype=torch.bool)])
    return block_mask(blocks, noisy, blocks, noisy)


@functools.lru_cache(maxsize=16)
def causal_mask(frames: int, tokens_per_frame: int, frames_per_block: int,
                device: str = "cpu") -> torch.Tensor:
    """Block-causal mask over one clean stream of ``frames`` (F P, F P)."""
    block = torch.arange(frames, device=device).div(frames_per_block, rounding_mode="floor")
    block = block.repeat_interleave(tokens_per_frame)
    clean = torch.zeros_like(block, dtype=torch.bool)
    return block_mask(block, clean, block, clean)
