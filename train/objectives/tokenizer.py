"""Stage `tokenizer`: train the frame autoencoder (`worldmodel.tokenizer.Tokenizer`) on frames.

No pretrained perceptual network exists offline, so the reconstruction loss is built from pixel
terms chosen to keep small sprites (Breakout's 2x2 ball is 4 of 4096 pixels: a plain L1/L2 can
ignore it and still look converged):
  - L1 on pixels (robust, does not blur as L2 does);
  - L1 on horizontal/vertical finite differences: edges, where sprites and text live;
  - an extra L1 on "foreground" pixels, those that differ from their frame's median colour (the
    background on games), with its weight a config value. Where static scenery is foreground too
    (Breakout's bricks and walls are 36% of a frame) this term does not single out sprites: the
    tokenizer trained with it alone erased the ball. With `foreground_union` (default) the mask
    also takes pixels that are foreground in the reconstruction: a sprite drawn where the frame
    has none (a ghost) then costs what a missing one does. Without it, the Breakout tokenizer
    drew each ball as a ladder of ~30 ghost pixels per frame, up to 200 levels off, that only the
    plain L1 (1/4096 per pixel) saw;
  - an extra L1 on "moving" pixels, those that change between neighbouring frames of a clip
    (the ball at both its positions, the paddle's edges), averaged over those pixels only, so a
    missing 1-pixel ball costs as much as a wrong paddle (`motion`, needs clip_len >= 2).
At export the EMA weights are saved with the per-channel latent statistics fitted on a sample
of data, so every later stage sees normalised latents.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tensordict import TensorDict

from train import UsageError
from train.objectives import AdamWConfig, EMASpec, Logs, Objective, OptimSpec, TrainContext, register
from worldmodel.tokenizer import Tokenizer, TokenizerConfig, tokenizer_config

WEIGHTS, CONFIG = "tokenizer.safetensors", "tokenizer.json"   # file names in the export dir


@dataclass
class TokenizerStageConfig(AdamWConfig):
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    ema_decay: float = 0.999
    ema_start: int = 0
    l1: float = 1.0                     # weight of the pixel L1
    edge: float = 1.0                   # weight of the finite-difference (edge) L1
    foreground: float = 4.0             # extra L1 weight on pixels that differ from the frame's median
    foreground_threshold: float = 0.1   # |pixel - median| above this (in [-1, 1] units) is foreground
    foreground_union: bool = True       # foreground = in the frame OR in the reconstruction (ghosts count)
    motion: float = 0.0                 # extra L1 weight on pixels that change within a clip (0 = off)
    motion_threshold: float = 0.1       # |pixel - neighbouring frame's| above this is moving
    latent_l2: float = 1e-4             # keeps raw latents from drifting in scale before normalisation
    # Scale equivariance (Skorokhodov et al. 2025, "Improving the diffusability of autoencoders"):
    # the decoder must also turn 2x2-average-pooled latents into the 2x2-average-pooled frame, with
    # this weight on that reconstruction loss. It makes the low latent frequencies carry the image
    # and stops high-frequency latent detail (noise to a diffusion model) from paying off.
    scale_equivariance: float = 0.0
    norm_batches: int = 8               # batches encoded at export to fit the latent statistics
    # Decoder fine-tuning of an existing tokenizer (``init_from=<tokenizer export>``): the encoder
    # and the latent statistics stay frozen, so every model trained on its latents stays valid,
    # and only the decoder learns to render them better (as image VAEs ship improved decoders).
    decoder_only: bool = False


def frames_to_images(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1]."""
    return frames.movedim(-1, -3).float() / 127.5 - 1.0


def foreground_mask(images: torch.Tensor, threshold: float) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) float, 1 where a pixel differs from its frame's median colour
    by more than `threshold` in any channel (on games the median is the background)."""
    median = images.flatten(2).median(dim=2).values[..., None, None]  # (N, 3, 1, 1)
    return ((images - median).abs() > threshold).any(dim=1, keepdim=True).float()


def motion_mask(images: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, T, 3, H, W) clips -> (B, T, 1, H, W) float, 1 where a pixel differs from the same pixel
    of the previous or the next frame by more than `threshold` in any channel."""
    moved = ((images[:, 1:] - images[:, :-1]).abs() > threshold).any(dim=2, keepdim=True)
    none = torch.zeros_like(moved[:, :1])
    return (torch.cat([none, moved], 1) | torch.cat([moved, none], 1)).float()


def ghost_pixels(recon: torch.Tensor, target: torch.Tensor, threshold: float) -> torch.Tensor:
    """Mean count per image of pixels that are foreground in the reconstruction but not in the
    target (N, 3, H, W): sprites drawn where there are none, which plain PSNR barely sees."""
    ghost = (foreground_mask(recon, threshold) > 0) & (foreground_mask(target, threshold) == 0)
    return ghost.flatten(1).sum(1).float().mean()


def edge_l1(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 between horizontal and vertical finite differences of (N, C, H, W) images."""
    dx = lambda x: x[..., :, 1:] - x[..., :, :-1]  # noqa: E731
    dy = lambda x: x[..., 1:, :] - x[..., :-1, :]  # noqa: E731
    return 0.5 * ((dx(recon) - dx(target)).abs().mean() + (dy(recon) - dy(target)).abs().mean())


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, cfg: TokenizerStageConfig,
                        moving: torch.Tensor | None = None) -> tuple[torch.Tensor, Logs]:
    """Weighted sum of pixel L1, edge L1, foreground L1 and (given the (N, 1, H, W) `moving` mask)
    moving-pixel L1 on (N, 3, H, W) images, fp32."""
    recon, target = recon.float(), target.float()
    err = (recon - target).abs()
    fg = foreground_mask(target, cfg.foreground_threshold)
    if cfg.foreground_union:  # the mask is a weight, not a path for gradients
        fg = torch.maximum(fg, foreground_mask(recon.detach(), cfg.foreground_threshold))
    l1 = err.mean()
    edge = edge_l1(recon, target)
    # Mean over foreground pixels only, so the term does not vanish when sprites are tiny.
    fg_l1 = (err * fg).sum() / (3 * fg.sum()).clamp_min(1.0)
    loss = cfg.l1 * l1 + cfg.edge * edge + cfg.foreground * fg_l1
    logs = {"l1": l1.detach(), "edge": edge.detach(), "fg_l1": fg_l1.detach(), "fg_frac": fg.mean().detach()}
    if moving is not None:
        motion_l1 = (err * moving).sum() / (3 * moving.sum()).clamp_min(1.0)
        loss = loss + cfg.motion * motion_l1
        logs.update(motion_l1=motion_l1.detach(), motion_frac=moving.mean().detach())
    return loss, logs


def latent_roughness(raw: torch.Tensor) -> torch.Tensor:
    """(N, h, w, c) latents -> mean over channels of E[(z[x+1] - z[x])^2] / (2 Var z)."""
    z = raw.float().flatten(0, -4)
    diff = (z[:, :, 1:] - z[:, :, :-1]).pow(2).mean((0, 1, 2))
    return (diff / (2 * z.var((0, 1, 2)).clamp_min(1e-12))).mean()


def psnr(recon: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """PSNR in dB of images in [-1, 1] after rounding to uint8 levels, over `mask` pixels if given."""
    q = lambda x: ((x.float().clamp(-1, 1) + 1) * 127.5).round()  # noqa: E731
    se = (q(recon) - q(target)) ** 2
    mse = se.mean() if mask is None else (se * mask).sum() / (3 * mask.sum()).clamp_min(1.0)
    return 10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))


@register("tokenizer")
class TokenizerObjective(Objective):
    Config = TokenizerStageConfig

    def __init__(self, cfg: TokenizerStageConfig, ctx: TrainContext) -> None:
        super().__init__(cfg, ctx)
        if cfg.decoder_only:
            if ctx.init_from is None:
                raise UsageError("stage.decoder_only=true fine-tunes an existing tokenizer's decoder: "
                                 "give it with init_from=<tokenizer export dir>")
            self.tokenizer = load_tokenizer(ctx.init_from).train()
            self.tokenizer.encoder.requires_grad_(False)
            self.tokenizer.encoder.eval()
        else:
            self.tokenizer = Tokenizer(tokenizer_config(**ctx.model["tokenizer"]))
        clip_len = ctx.extra.get("clip_len")
        if cfg.motion > 0 and clip_len is not None and clip_len < 2:
            raise UsageError(f"stage.motion={cfg.motion} weighs pixels that move between frames of a clip, "
                             f"but data.clip_len={clip_len}: set data.clip_len=2 (or more), or stage.motion=0")

    def networks(self) -> dict[str, nn.Module]:
        return {"tokenizer": self.tokenizer}

    def optimizers(self) -> dict[str, OptimSpec]:
        c = self.cfg
        return {"tokenizer": c.adamw("tokenizer", c.lr, ema=(EMASpec("tokenizer", c.ema_decay, c.ema_start),))}

    def loss(self, name: str, batch: TensorDict, step: int,
             nets: Mapping[str, nn.Module]) -> tuple[torch.Tensor, Logs]:
        clips = frames_to_images(batch["frames"])  # (B, T, 3, H, W)
        images = clips.flatten(0, 1)  # (B*T, 3, H, W)
        moving = None
        if self.cfg.motion > 0 and clips.shape[1] > 1:
            moving = motion_mask(clips, self.cfg.motion_threshold).flatten(0, 1)
        se = self.cfg.scale_equivariance
        recon, raw, *small = nets["tokenizer"](images, downsampled=se > 0)
        loss, logs = reconstruction_loss(recon, images, self.cfg, moving)
        if se > 0:
            small_loss, _ = reconstruction_loss(small[0], F.avg_pool2d(images, 2), self.cfg)
            loss = loss + se * small_loss
            logs["se_loss"] = small_loss.detach()
        latent_l2 = raw.float().pow(2).mean()
        logs["latent_rms"] = latent_l2.detach().sqrt()
        return loss + self.cfg.latent_l2 * latent_l2, logs

    @torch.no_grad()
    def evaluate(self, step: int, nets: Mapping[str, nn.Module],
                 batches: Iterator[TensorDict]) -> dict[str, float]:
        """PSNR over whole frames and over foreground (sprite) pixels only, and the latents'
        spatial roughness: mean squared difference of horizontally neighbouring latents over twice
        the per-channel variance (about 1 for white noise, 0 for constant maps). Rough latents are
        hard for a diffusion model to predict, whatever the reconstruction PSNR."""
        clips = frames_to_images(next(batches)["frames"])
        images = clips.flatten(0, 1)
        recon, raw = nets["tokenizer"](images)
        fg = foreground_mask(images, self.cfg.foreground_threshold)
        out = {"psnr": psnr(recon, images).item(), "psnr_fg": psnr(recon, images, fg).item(),
               "ghost_px": ghost_pixels(recon, images, self.cfg.foreground_threshold).item(),
               "latent_roughness": latent_roughness(raw).item()}
        if clips.shape[1] > 1:  # PSNR where things move: a tokenizer that drops sprites reads low here
            moving = motion_mask(clips, self.cfg.motion_threshold).flatten(0, 1)
            out["psnr_motion"] = psnr(recon, images, moving).item()
        return out

    @torch.no_grad()
    def export(self, out_dir: Path, weights: Mapping[str, dict[str, torch.Tensor]],
               batches: Iterator[TensorDict]) -> None:
        """EMA weights + latent statistics fitted on `norm_batches` batches, as safetensors + JSON."""
        tok = Tokenizer(self.tokenizer.config).to(self.ctx.device)
        tok.load_state_dict(weights["tokenizer"])
        tok.eval()
        if self.cfg.decoder_only:  # the latent space must not move: keep the statistics it came with
            save_tokenizer(tok, out_dir)
            return
        with self.ctx.autocast():
            raw = torch.cat([tok.encode_images(frames_to_images(next(batches)["frames"]), normalize=False)
                             .reshape(-1, *tok.config.latent_shape) for _ in range(self.cfg.norm_batches)])
        tok.fit_normalization(raw)
        save_tokenizer(tok, out_dir)


def save_tokenizer(tok: Tokenizer, out_dir: Path) -> None:
    """`tokenizer.safetensors` (fp32 weights + latent statistics) and `tokenizer.json` (config)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in tok.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS))
    (out_dir / CONFIG).write_text(json.dumps({"config": asdict(tok.config)}, indent=2))


def load_tokenizer(export_dir: Path, device: torch.device | str = "cpu") -> Tokenizer:
    """A tokenizer written by `save_tokenizer` (the tokenizer stage's export), in eval mode."""
    export_dir = Path(export_dir)
    cfg = TokenizerConfig(**json.loads((export_dir / CONFIG).read_text())["config"])
    tok = Tokenizer(cfg)
    tok.load_state_dict(load_file(str(export_dir / WEIGHTS)))
    return tok.to(device).eval()
