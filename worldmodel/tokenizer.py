"""Frame tokenizer: a small convolutional autoencoder, frames (H, W, 3) <-> latents (h, w, c).

The world model diffuses in latent space; this module is the only place that touches pixels. Its
decoder runs on every displayed frame, so it is sized for speed on a CPU (see the timing note
above the size registry), and its latents are normalised per channel (zero mean, unit variance on the data the
statistics were fitted on) as `docs/CONVENTIONS.md` prescribes.

Layout, small to large: config -> residual block -> encoder / decoder -> `Tokenizer` -> size registry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

CL = torch.channels_last  # every 4-D activation and weight here is NHWC in memory (oneDNN's fast path)


@dataclass
class TokenizerConfig:
    """Shape and size of the autoencoder; everything else is derived from it.

    The first and last layers trade space for depth (pixel unshuffle / shuffle by 2), so the
    networks start and end at half resolution: `channels[i]` is the width at resolution
    `image_size / 2**(i + 1)`, from `image_size / 2` down to `latent_size`, one entry per
    resolution. `encoder_blocks` / `decoder_blocks` give the residual blocks at each of those
    resolutions; they are separate because only the decoder runs per displayed frame.
    """

    image_size: int = 64
    latent_size: int = 8
    latent_channels: int = 8
    channels: Sequence[int] = (32, 64, 128)
    encoder_blocks: Sequence[int] = (1, 1, 1)
    decoder_blocks: Sequence[int] = (1, 1, 0)
    # decoder upsampling: "nearest" (nearest-neighbour x2, then a conv) or "shuffle" (a conv
    # predicts each cell's 2x2 children, then a pixel shuffle; see SubpixelUpsample)
    upsample: str = "nearest"

    def __post_init__(self) -> None:
        # Hydra/OmegaConf hand sequences over as ListConfig: store plain tuples.
        self.channels = tuple(int(c) for c in self.channels)
        self.encoder_blocks = tuple(int(b) for b in self.encoder_blocks)
        self.decoder_blocks = tuple(int(b) for b in self.decoder_blocks)
        if self.image_size <= 0 or self.latent_size <= 0 or self.latent_channels <= 0:
            raise ValueError(
                f"image_size, latent_size and latent_channels must be positive, got "
                f"{self.image_size}, {self.latent_size}, {self.latent_channels}"
            )
        ratio = self.image_size // self.latent_size
        if self.image_size % self.latent_size or ratio < 2 or ratio & (ratio - 1):
            raise ValueError(
                f"image_size / latent_size must be a power of two >= 2 (each stage halves the "
                f"resolution), got {self.image_size} / {self.latent_size}"
            )
        n = self.num_resolutions
        for name in ("channels", "encoder_blocks", "decoder_blocks"):
            value = getattr(self, name)
            if len(value) != n:
                raise ValueError(
                    f"{name} needs one entry per resolution {self.resolutions} (image_size / 2 "
                    f"down to latent_size), i.e. {n} entries; got {len(value)}: {value}"
                )
        if self.upsample not in ("nearest", "shuffle"):
            raise ValueError(f"upsample must be 'nearest' or 'shuffle', got {self.upsample!r}")
        if min(self.channels) <= 0 or min(self.encoder_blocks + self.decoder_blocks) < 0:
            raise ValueError(f"channels must be positive and block counts >= 0, got {self}")

    @property
    def num_resolutions(self) -> int:
        """Resolutions the networks work at, from `image_size / 2` down to `latent_size`."""
        return int(math.log2(self.image_size // self.latent_size))

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Side length at each resolution, e.g. (32, 16, 8)."""
        return tuple(self.image_size >> (i + 1) for i in range(self.num_resolutions))

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        """(H, W, 3) of one uint8 frame."""
        return (self.image_size, self.image_size, 3)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(h, w, c) of one frame's latents."""
        return (self.latent_size, self.latent_size, self.latent_channels)

    @property
    def tokens_per_frame(self) -> int:
        """h * w: the number of latent positions per frame."""
        return self.latent_size**2


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
    # He init rather than PyTorch's default (a sixth of He's variance): with no norm layer to
    # rescale it, the signal (and a few-pixel sprite's gradient) would fade a little at every one
    # of the autoencoder's ~10 convs.
    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    nn.init.zeros_(conv.bias)
    return conv


class ResBlock(nn.Module):
    """x + conv(silu(conv(silu(x)))), without normalisation; the second conv starts at zero.

    Why no GroupNorm: a norm layer costs two extra passes per block on the decoder's hot path, and
    its per-group statistics are dominated by the background, so a few-pixel sprite (Breakout's
    ball) is a rounding error to it. Zero-initialising the residual branch makes every block an
    identity at step 0, which is what keeps a norm-free stack of this depth stable to train.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(channels, channels)
        self.conv2 = conv3x3(channels, channels)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> (N, C, H, W)."""
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class Upsample(nn.Module):
    """SiLU, nearest-neighbour x2, 3x3 conv: (N, C_in, H, W) -> (N, C_out, 2H, 2W).

    Nearest + conv rather than a transposed conv: no checkerboard artefacts on flat game
    backgrounds, and `upsample_nearest2d` has a native channels-last kernel. The SiLU (before the
    upsample: 4x fewer elements) keeps a nonlinearity between stages that have no residual block;
    placing a sprite inside a latent cell is a nonlinear function of the latent.
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = conv3x3(c_in, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(F.silu(x), scale_factor=2.0, mode="nearest"))


class SubpixelUpsample(nn.Module):
    """SiLU, 3x3 conv to 4x the channels, pixel shuffle: (N, C_in, H, W) -> (N, C_out, 2H, 2W).

    Nearest-neighbour upsampling hands a cell's features to its four children identically, and
    only the convs after it can tell the children apart. A sprite smaller than a latent cell
    (Breakout's ball in a 4x4-pixel cell) then tends to come out in two or four of them: a double
    dot two rows apart. Here every child gets its own output channels, so where inside the cell
    the sprite sits is decided at once. ICNR initialisation (each child's filters start equal)
    makes it start out as nearest-neighbour upsampling, without checkerboard artefacts.
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = conv3x3(c_in, 4 * c_out)
        with torch.no_grad():
            base = conv3x3(c_in, c_out).weight  # (C_out, C_in, 3, 3), He init
            self.conv.weight.copy_(base.repeat_interleave(4, dim=0))  # pixel_shuffle's channel order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.conv(F.silu(x)), 2)


class Encoder(nn.Module):
    """images (N, 3, H, W) in [-1, 1] -> raw latents (N, c, h, w).

    Pixel unshuffle first: each 2x2 patch becomes 12 channels, losslessly, so even a 1-pixel
    sprite reaches the first conv intact, and no conv runs at full resolution (3-channel convs
    are the least efficient shape there is for oneDNN).
    """

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        ch, blocks = cfg.channels, cfg.encoder_blocks
        self.conv_in = conv3x3(3 * 4, ch[0])
        layers: list[nn.Module] = []
        for i in range(cfg.num_resolutions):
            if i > 0:  # a learned (strided) downsample rather than pooling keeps sub-stride detail
                layers += [nn.SiLU(), conv3x3(ch[i - 1], ch[i], stride=2)]
            layers += [ResBlock(ch[i]) for _ in range(blocks[i])]
        self.layers = nn.Sequential(*layers)
        # No bounding nonlinearity (tanh etc.): raw latents are normalised by fitted statistics.
        self.conv_out = nn.Conv2d(ch[-1], cfg.latent_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(F.pixel_unshuffle(x, 2))  # (N, 12, H/2, W/2) -> (N, ch[0], H/2, W/2)
        return self.conv_out(F.silu(self.layers(x)))


class Decoder(nn.Module):
    """raw latents (N, c, h, w) -> images (N, 3, H, W), roughly in [-1, 1] (not clamped).

    Mirrors the encoder; the last conv predicts each 2x2 pixel patch (12 channels) at half
    resolution and a pixel shuffle lays them out (sub-pixel convolution, Shi et al. 2016), so no
    conv runs at full resolution here either: that was ~20 % of the decode time.
    """

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        ch, blocks = cfg.channels, cfg.decoder_blocks
        self.conv_in = conv3x3(cfg.latent_channels, ch[-1])
        layers: list[nn.Module] = []
        for i in reversed(range(cfg.num_resolutions)):
            layers += [ResBlock(ch[i]) for _ in range(blocks[i])]
            if i > 0:
                up = SubpixelUpsample if cfg.upsample == "shuffle" else Upsample
                layers.append(up(ch[i], ch[i - 1]))
        self.layers = nn.Sequential(*layers)
        self.conv_out = conv3x3(ch[0], 3 * 4)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_out(F.silu(self.layers(self.conv_in(z))))  # (N, 12, H/2, W/2)
        return F.pixel_shuffle(x, 2)  # (N, 3, H, W)


class Tokenizer(nn.Module):
    """Encoder + decoder + per-channel latent statistics.

    Public API speaks the project's conventions: `frames` uint8 (..., H, W, 3), `images` float
    (..., 3, H, W) in [-1, 1], `latents` float (..., h, w, c). Any leading dims are accepted.
    "Raw" latents are the encoder's output; "normalised" latents are `(raw - mean) / std` with the
    statistics from `fit_normalization`, stored as buffers so they travel with `state_dict()`.

    Precision: the compute dtype is the parameters' dtype (`model.to(torch.bfloat16)` for
    inference), or the caller's autocast; the normalisation, the returned latents/images and the
    uint8 rounding are always fp32.
    """

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        c = config.latent_channels
        self.register_buffer("latent_mean", torch.zeros(c))
        self.register_buffer("latent_std", torch.ones(c))
        self.to(memory_format=CL)  # conv weights NHWC too, so oneDNN never reorders them per call

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: that of the parameters."""
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Tokenizer:
        # `model.to(torch.bfloat16)` casts buffers too; the latent statistics must stay fp32 (a bf16
        # std has 3 significant digits), so keep them fp32 and let only their device follow.
        stats = {name: getattr(self, name) for name in ("latent_mean", "latent_std")}
        super()._apply(fn, recurse)
        for name, old in stats.items():
            new = getattr(self, name)
            if new.dtype != torch.float32:
                setattr(self, name, old.to(device=new.device, dtype=torch.float32))
        return self

    # ----- normalisation (fp32) -----------------------------------------------------------

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """raw latents (..., h, w, c) -> normalised latents (..., h, w, c), fp32."""
        return (raw.float() - self.latent_mean) / self.latent_std

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """normalised latents (..., h, w, c) -> raw latents (..., h, w, c), fp32."""
        return latents.float() * self.latent_std + self.latent_mean

    @torch.no_grad()
    def fit_normalization(self, raw: torch.Tensor, eps: float = 1e-6) -> None:
        """Set the per-channel mean/std buffers from raw latents (..., h, w, c), e.g. a dataset's
        `encode_images(images, normalize=False)`. Statistics are computed in float64."""
        self._check(raw, self.config.latent_shape, "raw latents", "(..., h, w, c)")
        flat = raw.detach().reshape(-1, self.config.latent_channels).double()
        if flat.shape[0] < 2:
            raise ValueError("fit_normalization needs at least two latent positions")
        self.latent_mean.copy_(flat.mean(0))
        self.latent_std.copy_(flat.std(0).clamp_min(eps))

    # ----- float images <-> latents (training) --------------------------------------------

    def encode_images(self, images: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
        """images (..., 3, H, W) in [-1, 1] -> latents (..., h, w, c), fp32; raw if not `normalize`."""
        H, W, _ = self.config.frame_shape
        self._check(images, (3, H, W), "images", "(..., 3, H, W)")
        lead = images.shape[:-3]
        x = images.reshape(-1, 3, H, W).to(self.dtype).contiguous(memory_format=CL)
        raw = self.encoder(x).permute(0, 2, 3, 1)  # (N, h, w, c): a free view of the NHWC output
        raw = raw.float().reshape(*lead, *self.config.latent_shape)
        return self.normalize(raw) if normalize else raw

    def decode_images(self, latents: torch.Tensor, *, normalized: bool = True) -> torch.Tensor:
        """latents (..., h, w, c), normalised unless `normalized=False` -> images (..., 3, H, W), fp32,
        roughly in [-1, 1] and not clamped (losses should see the overshoot)."""
        self._check(latents, self.config.latent_shape, "latents", "(..., h, w, c)")
        lead = latents.shape[:-3]
        raw = self.denormalize(latents) if normalized else latents
        z = raw.reshape(-1, *self.config.latent_shape).to(self.dtype).permute(0, 3, 1, 2)  # NHWC view
        x = self.decoder(z.contiguous(memory_format=CL))
        return x.float().reshape(*lead, 3, *self.config.frame_shape[:2])

    def forward(self, images: torch.Tensor, downsampled: bool = False
                ) -> tuple[torch.Tensor, ...]:
        """images (..., 3, H, W) in [-1, 1] -> (recon (..., 3, H, W) fp32, raw latents (..., h, w, c)
        fp32). Raw, because the autoencoder is trained before its statistics are fitted.

        ``downsampled``: also decode the latents average-pooled 2x2, (..., 3, H/2, W/2) fp32, for
        the scale-equivariance regulariser (the decoder is fully convolutional); computed here so
        that a DDP-wrapped tokenizer sees every decoder call in its forward.
        """
        raw = self.encode_images(images, normalize=False)
        recon = self.decode_images(raw, normalized=False)
        if not downsampled:
            return recon, raw
        lead = raw.shape[:-3]
        z = raw.reshape(-1, *self.config.latent_shape).to(self.dtype).permute(0, 3, 1, 2)
        small = self.decoder(F.avg_pool2d(z, 2).contiguous(memory_format=CL)).float()
        return recon, raw, small.reshape(*lead, *small.shape[1:])

    # ----- uint8 frames <-> latents (recording, play) -------------------------------------

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """frames uint8 (..., H, W, 3) -> normalised latents (..., h, w, c), fp32."""
        self._check(frames, self.config.frame_shape, "frames", "(..., H, W, 3)")
        if frames.dtype != torch.uint8:
            raise TypeError(f"frames must be uint8, got {frames.dtype}")
        lead = frames.shape[:-3]
        H, W, _ = self.config.frame_shape
        # (N, H, W, 3) -> (N, 3, H, W) by permuting: already channels-last in memory, no copy.
        x = frames.reshape(-1, H, W, 3).permute(0, 3, 1, 2).to(self.dtype) / 127.5 - 1.0
        raw = self.encoder(x.contiguous(memory_format=CL)).permute(0, 2, 3, 1)
        return self.normalize(raw.reshape(*lead, *self.config.latent_shape))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """normalised latents (..., h, w, c) -> frames uint8 (..., H, W, 3), rounded to nearest."""
        images = self.decode_images(latents)  # (..., 3, H, W) fp32, NHWC in memory
        frames = images.movedim(-3, -1)  # (..., H, W, 3): a view, contiguous thanks to NHWC
        return frames.add(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)

    @staticmethod
    def _check(x: torch.Tensor, trailing: tuple[int, ...], name: str, layout: str) -> None:
        if x.dim() < len(trailing) or tuple(x.shape[-len(trailing):]) != trailing:
            raise ValueError(
                f"{name} must have shape {layout} = (..., {', '.join(map(str, trailing))}) for this "
                f"tokenizer config, got {tuple(x.shape)}"
            )


# ----- size registry ----------------------------------------------------------------------
# Timing of `small` (0.68 M parameters: encoder 0.48 M, decoder 0.20 M), 2 cores of an AMD EPYC
# with avx512_bf16 and no AMX, torch 2.13 CPU, weights cast with `.to(dtype)`, inference_mode:
#                                 bf16             fp32        (without channels-last: bf16 / fp32)
#   decode 1 frame (uint8 out)    1.02-1.08 ms     1.41-1.50 ms   1.43-1.52 / 1.93-2.05 ms
#   encode, batch 256             1,850-2,090 /s   850-905 /s     1,500-1,600 / 630-640 /s
#   train step, batch 64, AdamW   170-190 ms (bf16 autocast)      320-340 ms  (216 / 382 ms)
# Why the decoder has no block at 8x8: convs there are overhead-bound (128 channels: ~100 us each
# in bf16, half the FLOP rate they reach at 32x32), so one residual block costs +25 % decode time;
# its blocks sit at 32x32 and 16x16, where sprites are drawn. torch.compile of the decoder gains
# ~3 %; a batch of 8 frames decodes in 4.0 ms.

TOKENIZER_SIZES: dict[str, TokenizerConfig] = {
    # 57 k parameters: tests and smoke runs (learns a 2x2 sprite on a few frames in 200 steps).
    "tiny": TokenizerConfig(channels=(16, 16, 32), encoder_blocks=(0, 0, 1), decoder_blocks=(0, 0, 1)),
    "small": TokenizerConfig(),  # the default, timed above
    # 16x16x8 latents: each latent covers 4x4 pixels, so a 1-2 pixel sprite such as Breakout's
    # ball lands in one latent instead of one 8x8-pixel cell. Measured on Breakout (real frames
    # through the tokenizer, ball shown as one ball; real play 0.82): 4 channels with nearest
    # upsampling 0.39 after 7.6k steps, 4 channels with sub-pixel upsampling 0.53 and 8 channels
    # 0.74 after 2.5k steps each.
    "fine": TokenizerConfig(latent_size=16, latent_channels=8, channels=(32, 64),
                            encoder_blocks=(1, 1), decoder_blocks=(1, 1), upsample="shuffle"),
}


def tokenizer_config(size: str = "small", **overrides: object) -> TokenizerConfig:
    """A copy of a named size from `TOKENIZER_SIZES`, with optional field overrides."""
    if size not in TOKENIZER_SIZES:
        raise KeyError(f"unknown tokenizer size {size!r}; known sizes: {sorted(TOKENIZER_SIZES)}")
    return replace(TOKENIZER_SIZES[size], **overrides)
