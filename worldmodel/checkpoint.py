"""World checkpoints: one safetensors file that play.py and the env load with no training code.

Tensors: ``dit.*``, ``tokenizer.*``, optional ``reward.*``, optional ``context.frames`` (uint8
(N, H, W, 3) real frames) and ``context.actions`` (int64 (N,), -1 where unknown). The safetensors
metadata holds ``format`` (= ``FORMAT``), ``version`` and ``config``: a JSON document with the DiT
and tokenizer configs, the action names, engine defaults (step counts, shift, window, sink), and
free-form world info (name, game, fps, keymap, provenance), and ``sha256``: a digest of every
tensor's name, dtype, shape and bytes, checked on load, so a file damaged on disk or in transfer
(flipped bytes that still parse) is refused instead of playing noise. Files written before the
digest existed load without the check.

Writes are atomic (temporary file, fsync, rename), so a crash never leaves a half-written world.
Loading checks every failure a user can cause and says what to do about it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from worldmodel.dit import DiT, DiTConfig
from worldmodel.reward import RewardConfig, RewardHeads
from worldmodel.tokenizer import Tokenizer, TokenizerConfig

FORMAT = "worldmodel.world"
VERSION = 1


class CheckpointError(ValueError):
    """A world checkpoint is missing, damaged, of the wrong kind, or inconsistent."""


@dataclass
class World:
    """Everything a loaded world checkpoint provides."""

    dit: DiT
    tokenizer: Tokenizer
    action_names: list[str]
    engine: dict = field(default_factory=dict)   # defaults for EngineConfig
    info: dict = field(default_factory=dict)     # name, game, fps, keymap, provenance
    reward: RewardHeads | None = None
    context_frames: torch.Tensor | None = None   # uint8 (N, H, W, 3)
    context_actions: torch.Tensor | None = None  # int64 (N,)
    path: str | None = None


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in name order: name, dtype, shape and raw bytes of each."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def save_world(path: str | os.PathLike, world: World, dtype: torch.dtype | None = torch.bfloat16) -> None:
    """Write ``world`` to ``path`` atomically; float weights stored as ``dtype`` (None = as is)."""
    tensors: dict[str, torch.Tensor] = {}
    modules = {"dit": world.dit, "tokenizer": world.tokenizer, "reward": world.reward}
    for prefix, module in modules.items():
        if module is None:
            continue
        for name, t in module.state_dict().items():
            t = t.detach().cpu()
            # normalisation statistics stay fp32: they rescale every latent
            if dtype is not None and t.is_floating_point() and "latent_" not in name:
                t = t.to(dtype)
            tensors[f"{prefix}.{name}"] = t.contiguous()
    if world.context_frames is not None:
        tensors["context.frames"] = world.context_frames.to(torch.uint8).contiguous()
        acts = world.context_actions
        if acts is None:
            acts = torch.full((len(world.context_frames),), -1, dtype=torch.long)
        tensors["context.actions"] = acts.to(torch.long).contiguous()
    config = {
        "dit": world.dit.cfg.to_dict(),
        "tokenizer": {k: list(v) if isinstance(v, tuple) else v
                      for k, v in vars(world.tokenizer.config).items()},
        "reward": world.reward.cfg.to_dict() if world.reward is not None else None,
        "action_names": list(world.action_names),
        "engine": world.engine,
        "info": world.info,
    }
    meta = {"format": FORMAT, "version": str(VERSION), "config": json.dumps(config),
            "sha256": tensor_digest(tensors)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shipped world must be readable by everyone
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_config(path: str | os.PathLike) -> dict:
    """The JSON config of a world checkpoint, validated, without loading tensors."""
    return _read_meta(path)[0]


def resolve_world_path(path: str | os.PathLike) -> Path:
    """A world file, or a training stage's export folder, which holds one as ``world.safetensors``."""
    path = Path(path)
    if path.is_dir():
        if not (path / "world.safetensors").is_file():
            raise CheckpointError(f"{path} is a folder without a world.safetensors; pass a world file "
                                  "(a stage's export/world.safetensors, or one made by python -m train.assemble)")
        return path / "world.safetensors"
    return path


def _read_meta(path: str | os.PathLike) -> tuple[dict, dict]:
    """(config, raw metadata) of a world checkpoint, validated."""
    path = resolve_world_path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass an existing .safetensors "
                              "world (or omit it to use the shipped default world)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or not a safetensors file ({e}); "
                              "re-export it from its training run") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a world checkpoint (format "
                              f"{meta.get('format')!r}); make one from a training run with `python -m train.assemble "
                              "--runs-root <runs> --data <dataset> --out <world>.safetensors`, or pass a "
                              "world file (python play.py --world NAME for a shipped one)")
    if int(meta.get("version", 0)) > VERSION:
        raise CheckpointError(f"{path} has format version {meta['version']}, newer than this code "
                              f"({VERSION}); update the package")
    return json.loads(meta["config"]), meta


def _load_module(module: torch.nn.Module, state: dict[str, torch.Tensor], prefix: str, path: Path) -> None:
    own = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(own))
    unexpected = sorted(set(own) - set(expected))
    shapes = [f"{k}: file {tuple(own[k].shape)} vs config {tuple(expected[k].shape)}"
              for k in set(own) & set(expected) if own[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{path}: the {prefix} weights do not match its config (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}); the file was written "
            "by a different model definition — re-export it")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in own.items()})


def load_world(path: str | os.PathLike, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, verify: bool = True) -> World:
    """Load a world checkpoint; models are put on ``device`` in ``dtype`` and in eval mode.
    ``verify=False`` skips the tensor digest (~60 ms for a 17 MB world on one busy core)."""
    path = resolve_world_path(path)
    config, meta = _read_meta(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged ({e}); re-export it") from e
    if verify and "sha256" in meta and tensor_digest(state) != meta["sha256"]:
        raise CheckpointError(f"checkpoint {path} is damaged: its tensors do not match the sha256 digest "
                              "stored with them (bytes changed on disk or in a copy); download or "
                              "re-assemble it (load_world(..., verify=False) loads it anyway)")
    try:
        dit = DiT(DiTConfig(**config["dit"]))
        tok = Tokenizer(TokenizerConfig(**config["tokenizer"]))
        reward = RewardHeads(RewardConfig(**config["reward"])) if config.get("reward") else None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its config does not describe a valid model ({e})") from e
    if len(config["action_names"]) != dit.cfg.num_actions:
        raise CheckpointError(f"{path}: {len(config['action_names'])} action names but the model "
                              f"has {dit.cfg.num_actions} actions")
    for prefix, module in (("dit", dit), ("tokenizer", tok), ("reward", reward)):
        if module is not None:
            _load_module(module, state, prefix, path)
    world = World(dit=dit, tokenizer=tok, action_names=list(config["action_names"]),
                  engine=dict(config.get("engine") or {}), info=dict(config.get("info") or {}),
                  reward=reward, context_frames=state.get("context.frames"),
                  context_actions=state.get("context.actions"), path=str(path))
    for m in (world.dit, world.tokenizer, world.reward):
        if m is not None:
            m.to(device=device, dtype=dtype).eval()
    return world  # the tokenizer keeps its latent statistics fp32 itself (Tokenizer._apply)
