"""Process group, device/dtype choice and data-parallel wrapping, written once for the loop.

One process per device. Under `torchrun` the environment gives RANK / WORLD_SIZE / LOCAL_RANK;
without it the run is a single process and nothing here touches torch.distributed. Backend: NCCL
on CUDA, gloo on CPU. Every collective below is called by every rank, in the same order.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

from train import UsageError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def check_device(device: str) -> None:
    """Raise UsageError unless ``device`` ("auto", "cpu", "cuda[:i]") names a device this machine
    has: torch's own failures for a missing GPU are an AttributeError (CPU builds) or a CUDA error
    deep inside the first step, which say nothing about the `device=` setting."""
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"device={device} is not a device: pass device=auto, cpu, cuda or cuda:<i>") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise UsageError(f"device={device}: training runs on cpu or cuda; pass device=auto, cpu, cuda or cuda:<i>")
    if not torch.cuda.is_available():
        raise UsageError(f"device={device} but this machine has no usable CUDA GPU (torch.cuda.is_available() "
                         "is False): pass device=cpu, or device=auto to use a GPU only where there is one")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"device={device} but this machine has {torch.cuda.device_count()} GPU(s), "
                         f"cuda:0..cuda:{torch.cuda.device_count() - 1}: pass one of those or device=cuda")


def init_distributed(device: str) -> tuple[Dist, torch.device]:
    """Join the process group if launched by torchrun; pick the device ("auto", "cpu", "cuda[:i]")."""
    check_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local)  # one GPU per process
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        # TF32 matmuls/convs for whatever still runs in fp32 under autocast (~free accuracy-wise).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        # Subnormal floats are ~100x slower on x86; zero-initialised residual branches produce
        # them early in training (measured: the tokenizer's first steps ran 10x slower without this).
        torch.set_flush_denormal(True)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local), dev


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """Autocast dtype: "auto" = bf16 where the hardware has it (CUDA bf16, or a CPU whose oneDNN
    has native bf16, ~2x fp32 matmul there), else fp32; or exactly "bf16" / "fp16" / "fp32"."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


def wrap(net: nn.Module, how: str, device: torch.device, find_unused: bool = False) -> nn.Module:
    """Wrap a trainable network for data parallelism ("ddp" or "fsdp"); identity on one process.

    DDP broadcasts rank 0's weights at construction. FSDP (FSDP2 `fully_shard`, in place, one
    shard group for the whole network) does not: ranks must build identical weights, which the
    loop ensures by seeding every rank alike before the objective is built. FSDP runs on CPU
    (gloo) as well as CUDA, which is how the tests exercise it.
    """
    if not dist.is_initialized():
        return net
    if how == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return DDP(net, device_ids=ids, find_unused_parameters=find_unused)
    if how == "fsdp":
        # FSDP shards a parameter's storage as one flat row-major buffer and refuses any other
        # layout; the tokenizer keeps its conv weights channels-last for oneDNN. Sharded, they
        # go back to the standard layout (activations stay channels-last).
        for p in net.parameters():
            if not p.is_contiguous():
                p.data = p.data.contiguous()
        fully_shard(net)
        return net
    raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {how!r}")


def no_sync(nets: list[nn.Module]) -> AbstractContextManager:
    """Skip the gradient all-reduce of these wrapped networks (accumulation micro-steps)."""
    stack = ExitStack()
    for net in nets:
        if isinstance(net, DDP):
            stack.enter_context(net.no_sync())
        elif isinstance(net, FSDPModule):
            net.set_requires_gradient_sync(False)
            stack.callback(net.set_requires_gradient_sync, True)
    return stack


def full_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """The whole network's weights on CPU (gathers FSDP shards: collective under FSDP)."""
    if isinstance(net, FSDPModule):
        return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}


def gather_full(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DTensor shards -> full CPU tensors (collective if any is a DTensor), others -> CPU."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in tensors.items()}


def load_like(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into `target`, re-sharding it first if `target` is a DTensor shard."""
    if isinstance(target, DTensor):
        full = distribute_tensor(full.to(target.device), target.device_mesh, target.placements)
    target.copy_(full)


def all_gather_object(obj: Any, d: Dist) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (a list of one without a process group)."""
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(values: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= d.world_size
    return values


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
