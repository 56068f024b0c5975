"""What every transformer stage shares: building the DiT, passing weights between stages, the
flow-matching loss, and writing an engine-loadable world next to each stage's export.

Export layout of a transformer stage (``<run_dir>/export``):
    dit.safetensors   fp32 weights (EMA where the stage has one)
    dit.json          {"config": DiTConfig, "action_names": [...], "stage": name, "tokenizer": dir}
    world.safetensors a complete world checkpoint (tokenizer + this DiT + context frames), so
                      ``play.py --checkpoint`` and ``train.eval`` can run any stage directly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tensordict import TensorDict

from train import UsageError
from train.objectives.tokenizer import load_tokenizer
from worldmodel import diffusion
from worldmodel.checkpoint import World, save_world
from worldmodel.dit import DIT_SIZES, DiT, DiTConfig

WEIGHTS, CONFIG, WORLD = "dit.safetensors", "dit.json", "world.safetensors"
CONTEXT_FRAMES = 32  # real frames carried by each exported world, so reset needs no dataset


class StageError(UsageError):
    """A stage cannot start: the message names the missing piece and the fix (CLI: one line, exit 2)."""


def read_export(export_dir: Path) -> dict:
    path = Path(export_dir) / CONFIG
    if not path.exists():
        raise StageError(f"{export_dir} is not a transformer-stage export (no {CONFIG}); run the "
                         "previous stage first or point init_from=<its run_dir>/export")
    return json.loads(path.read_text())


def tokenizer_dir(stage_cfg: Any, init_from: Path | None) -> Path:
    """The tokenizer export this stage's latents come from: the stage config, else the init's."""
    if getattr(stage_cfg, "tokenizer", None):
        return Path(stage_cfg.tokenizer)
    if init_from is not None:
        return Path(read_export(init_from)["tokenizer"])
    raise StageError("no tokenizer: set data.tokenizer=<tokenizer run_dir>/export")


def dit_config(model_cfg: Mapping[str, Any], tokenizer: Path, num_actions: int, clip_len: int,
               **overrides: Any) -> DiTConfig:
    """DiT config of the ``model`` group's size, shaped to the tokenizer's latents."""
    tok = json.loads((Path(tokenizer) / "tokenizer.json").read_text())["config"]
    d = dict(model_cfg.get("dit", {}))
    size = d.pop("size", "small")
    if size not in DIT_SIZES:
        raise StageError(f"unknown model.dit.size {size!r}; known: {sorted(DIT_SIZES)}")
    fields = {**DIT_SIZES[size], **d, "latent_size": tok["latent_size"],
              "latent_channels": tok["latent_channels"], "num_actions": num_actions,
              "train_frames": clip_len, "max_frames": max(64, clip_len), **overrides}
    return DiTConfig(**fields)


def load_dit_weights(dit: DiT, export_dir: Path) -> None:
    """Initialise ``dit`` from a previous transformer stage (shapes must agree)."""
    state = load_file(str(Path(export_dir) / WEIGHTS))
    own = dit.state_dict()
    reshaped = [k for k in state if k in own and own[k].shape != state[k].shape]
    if reshaped:
        raise StageError(f"{export_dir}: weights of another shape ({reshaped[:3]}, e.g. {reshaped[0]} "
                         f"{tuple(state[reshaped[0]].shape)} vs {tuple(own[reshaped[0]].shape)}): that stage "
                         "ran with another model size or patch; retrain it or use its model= settings")
    missing, unexpected = dit.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise StageError(f"{export_dir}: weights do not fit this stage's model (missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}); use the same model= size as that stage")


def latent_motion_mask(x0: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, F, h, w, c) clean latents -> (B, F, h, w) float, 1 where a latent differs from the same
    latent of the previous or the next frame by more than ``threshold`` in any channel."""
    moved = ((x0[:, 1:] - x0[:, :-1]).abs() > threshold).any(dim=-1)
    none = torch.zeros_like(moved[:, :1])
    return (torch.cat([none, moved], 1) | torch.cat([moved, none], 1)).float()


def flow_matching_loss(dit: torch.nn.Module, x0: torch.Tensor, actions: torch.Tensor,
                       sigma: torch.Tensor, weighting: str, shift: float,
                       clean: torch.Tensor | None = None, motion: float = 0.0,
                       motion_threshold: float = 0.5) -> tuple[torch.Tensor, dict]:
    """Rectified-flow loss: mean_(B,F) w(sigma) * mean_(h,w,c) (v_hat - (eps - x0))^2 over noisy frames.

    x0 (B, F, h, w, c) clean latents; sigma (B, F) fp32; ``clean`` enables teacher forcing.
    Frames given at sigma = 0 are clean conditioning (the context teacher's leading frames): they
    have nothing to denoise, so they leave the mean (their velocity target, eps - x0, is unknowable).

    ``motion`` > 0 adds ``motion`` times the same loss taken over the latents that change between
    neighbouring frames only (``latent_motion_mask``; needs clips of >= 2 frames). A frame's mean
    over all latents makes a 1-2 pixel sprite (Breakout's ball) a rounding error next to the
    static screen, so a model can reach a low loss with no ball at all; the extra term gives the
    moving latents the weight of a whole frame. This is a choice of ours, not Causal Forcing's, and
    it tilts the learnt distribution towards the moving content (the mask depends on x0), which is
    why it is off by default. ``logs["flow"]`` is the plain loss either way, so validation numbers
    stay comparable across runs.
    """
    eps = torch.randn_like(x0)
    x = diffusion.add_noise(x0, eps, sigma)
    v = dit(x, sigma, actions, clean=clean)
    per_latent = (v.float() - diffusion.velocity_target(x0, eps)).pow(2).mean(dim=4)  # (B, F, h, w)
    per_frame = per_latent.mean(dim=(2, 3))
    w = diffusion.loss_weight(sigma, weighting, shift)
    noisy = (sigma > 0).float()
    n = noisy.sum().clamp_min(1.0)
    flow = (w * per_frame * noisy).sum() / n
    logs = {"mse": ((per_frame * noisy).sum() / n).detach(), "flow": flow.detach()}
    moving = latent_motion_mask(x0, motion_threshold) if x0.shape[1] > 1 else None
    if moving is not None:
        count = moving.sum(dim=(2, 3))
        has = (count > 0).float() * noisy
        moving_frame = (per_latent * moving).sum(dim=(2, 3)) / count.clamp_min(1.0)
        logs["mse_moving"] = ((moving_frame * has).sum() / has.sum().clamp_min(1.0)).detach()
        logs["moving_frac"] = moving.mean().detach()
        if motion > 0:
            return flow + motion * (w * moving_frame * has).sum() / n, logs
    return flow, logs


def drop_actions(actions: torch.Tensor, p: float) -> torch.Tensor:
    """Classifier-free-guidance dropout: whole clips get the null action (-1) with probability p."""
    drop = torch.rand(actions.shape[0], device=actions.device) < p
    return torch.where(drop[:, None], torch.full_like(actions, -1), actions)


def context_sample(batches: Iterator[TensorDict], tokenizer, n: int = CONTEXT_FRAMES
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A few dozen real frames (decoded from latents) with their actions, for world resets."""
    batch = next(batches)
    if "frames" in batch.keys():
        frames = batch["frames"][0]
    else:
        with torch.no_grad():
            frames = tokenizer.decode(batch["latents"][0].float())
    acts = batch["actions"][0]
    return frames[:n].cpu(), acts[:n].cpu()


def save_export(out_dir: Path, dit: DiT, state: Mapping[str, torch.Tensor], action_names: list[str],
                stage: str, tokenizer: Path, batches: Iterator[TensorDict],
                engine: dict | None = None, info: dict | None = None) -> None:
    """Write dit.safetensors + dit.json + world.safetensors into ``out_dir``; ``info`` (what a
    later stage or the evaluation must know of how this model was trained) goes into both."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, str(out_dir / WEIGHTS))
    meta = {"config": asdict(dit.cfg), "action_names": list(action_names), "stage": stage,
            "tokenizer": str(Path(tokenizer).resolve()), **(info or {})}
    (out_dir / CONFIG).write_text(json.dumps(meta, indent=2))
    net = DiT(dit.cfg)
    net.load_state_dict(state)
    tok = load_tokenizer(tokenizer)
    frames, acts = context_sample(batches, tok)
    world = World(dit=net, tokenizer=tok, action_names=list(action_names), engine=engine or {},
                  info={"stage": stage, **(info or {})}, context_frames=frames, context_actions=acts)
    save_world(out_dir / WORLD, world, dtype=None)
