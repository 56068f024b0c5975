"""Pre-encoded latents on disk: every stage after the tokenizer trains on latents, and encoding
each clip again at every step would cost more than the tokenizer's training did.

A cache directory holds the latents of every episode of one frame source, encoded by one
tokenizer: `<cache_root>/<source key>-<tokenizer key>/latents.safetensors`, where the tokenizer
key is a hash of the tokenizer's weight file. Retraining the tokenizer changes the key, so stale
latents are never read; the stale directory of the same source is deleted when the new one is
written. Latents are stored as float16 (normalised latents are O(1), so this costs ~1e-3
relative error, well below the bf16 compute that produced them) and served as float32.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tensordict import TensorDict

from train.objectives.tokenizer import WEIGHTS, load_tokenizer

FILE = "latents.safetensors"
ENCODE_FRAMES = 256  # frames per encoder call while building: bounded memory, decent throughput


def tokenizer_key(export_dir: Path) -> str:
    """sha256 of the tokenizer's weight file (weights and latent statistics), 16 hex digits."""
    h = hashlib.sha256()
    with open(Path(export_dir) / WEIGHTS, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


class LatentSource:
    """A clip source (see `train/data.py`) over cached latents: `latents` float32 (T, h, w, c) and
    every other per-frame field of the original episodes (actions, rewards, ...)."""

    def __init__(self, directory: Path, action_names: list[str]) -> None:
        self.action_names = list(action_names)
        flat = load_file(str(Path(directory) / FILE))
        n = len({k.split("/")[0] for k in flat})
        self.episodes = [TensorDict({k.split("/", 1)[1]: v for k, v in flat.items() if k.split("/")[0] == str(i)},
                                    batch_size=[]) for i in range(n)]
        for ep in self.episodes:
            ep.batch_size = [ep["latents"].shape[0]]

    def episode_lengths(self) -> list[int]:
        return [ep.batch_size[0] for ep in self.episodes]

    def clip(self, episode: int, start: int, length: int) -> TensorDict:
        clip = self.episodes[episode][start:start + length].clone()
        clip["latents"] = clip["latents"].float()
        return clip


def latent_cache_dir(cache_root: Path, source_key: str, tokenizer_dir: Path) -> Path:
    """Where the latents of the source named `source_key`, encoded by this tokenizer, live."""
    src = hashlib.sha256(source_key.encode()).hexdigest()[:8]
    return Path(cache_root) / f"{src}-{tokenizer_key(tokenizer_dir)}"


def cached_lengths(out: Path) -> list[int] | None:
    """The episode lengths of the cache in `out`, read from its header only; None if absent."""
    if not (Path(out) / FILE).exists():
        return None
    with safe_open(str(Path(out) / FILE), framework="pt") as f:
        shapes = {k.split("/")[0]: f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith("/latents")}
    return [shapes[str(i)] for i in range(len(shapes))]


def build_latent_cache(source, tokenizer_dir: Path, out: Path, *, device: torch.device,
                       dtype: torch.dtype) -> None:
    """Encode every episode of `source` into `out` (from `latent_cache_dir`), replacing what is
    there. Call on one process only (the caller makes the others wait)."""
    tok = load_tokenizer(tokenizer_dir, device)
    flat: dict[str, torch.Tensor] = {}
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else torch.autocast(device.type, enabled=False))
    for i, n in enumerate(source.episode_lengths()):
        ep = source.clip(i, 0, n)
        with torch.no_grad(), autocast:
            latents = torch.cat([tok.encode(ep["frames"][j:j + ENCODE_FRAMES].to(device))
                                 for j in range(0, n, ENCODE_FRAMES)])
        flat[f"{i}/latents"] = latents.half().cpu().contiguous()
        for k, v in ep.items():
            if k != "frames":
                flat[f"{i}/{k}"] = v.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{FILE}.tmp.{os.getpid()}"
    save_file(flat, str(tmp))
    os.replace(tmp, out / FILE)
    src = out.name.split("-")[0]
    for stale in out.parent.glob(f"{src}-*"):  # the same source under an older tokenizer
        if stale != out:
            shutil.rmtree(stale, ignore_errors=True)
