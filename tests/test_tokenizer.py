"""Behaviour of the frame tokenizer (worldmodel/tokenizer.py): layouts, uint8 rounding, latent
normalisation, save/load, bf16 vs fp32, and that a tiny model can learn to keep a 2x2 sprite."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from worldmodel.tokenizer import TOKENIZER_SIZES, Tokenizer, TokenizerConfig, tokenizer_config


def make_tokenizer(seed: int = 0, **overrides: object) -> Tokenizer:
    torch.manual_seed(seed)
    tok = Tokenizer(tokenizer_config("tiny", **overrides)).eval()
    with torch.no_grad():  # wake the zero-initialised residual branches so every layer matters
        for name, p in tok.named_parameters():
            if name.endswith("conv2.weight"):
                p.normal_(0.0, 0.05)
    return tok


def random_frames(*lead: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (*lead, size, size, 3), generator=g, dtype=torch.uint8)


def sprite_frames(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n frames uint8 (n, 64, 64, 3): a dark background with one bright 2x2 square; and the
    squares' top-left corners (n, 2) as (row, col)."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.full((n, 64, 64, 3), 16, dtype=torch.uint8)
    frames[..., 2] = 40  # dark blue, so the three channels differ
    pos = torch.randint(4, 58, (n, 2), generator=g)
    for f, (r, c) in zip(frames, pos.tolist()):
        f[r:r + 2, c:c + 2] = torch.tensor([240, 220, 60], dtype=torch.uint8)
    return frames, pos


def to_images(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1]."""
    return frames.movedim(-1, -3).float() / 127.5 - 1.0


class Constant(nn.Module):
    """Stands in for the encoder or decoder: records its input, returns a fixed tensor."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out, self.seen = out, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return self.out.expand(x.shape[0], *self.out.shape[1:])


@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
def test_round_trip_shapes_and_dtypes(lead: tuple[int, ...]) -> None:
    tok = make_tokenizer()
    frames = random_frames(*lead)
    latents = tok.encode(frames)
    assert latents.shape == (*lead, 8, 8, 8) and latents.dtype == torch.float32
    out = tok.decode(latents)
    assert out.shape == (*lead, 64, 64, 3) and out.dtype == torch.uint8
    recon, raw = tok(to_images(frames))
    assert recon.shape == (*lead, 3, 64, 64) and raw.shape == (*lead, 8, 8, 8)
    assert recon.dtype == raw.dtype == torch.float32
    # Leading dims are only a batch: each frame is coded the same as on its own.
    if lead:
        flat = frames.reshape(-1, 64, 64, 3)
        last = latents.reshape(-1, 8, 8, 8)[-1]
        torch.testing.assert_close(last, tok.encode(flat[-1]), atol=1e-4, rtol=1e-4)
        alone = tok.decode(last)  # kernels may differ with the batch size
        assert (out.reshape(-1, 64, 64, 3)[-1].int() - alone.int()).abs().max() <= 1


def test_encode_sees_rgb_in_minus_one_one() -> None:
    """uint8 0..255 map to -1..1, and R, G, B land in channels 0, 1, 2 at the right pixels."""
    tok = make_tokenizer()
    stub = Constant(torch.zeros(1, 8, 8, 8))
    tok.encoder = stub
    frames = random_frames(2)
    tok.encode(frames)
    torch.testing.assert_close(stub.seen.float(), to_images(frames), atol=1e-6, rtol=0)
    assert tok.encode_images(to_images(frames)).shape == (2, 8, 8, 8)


def test_decode_rounds_and_clamps_to_uint8() -> None:
    tok = make_tokenizer()
    levels = torch.arange(64 * 64 * 3, dtype=torch.float32).remainder(256).reshape(1, 3, 64, 64)
    # Off-grid by up to +-0.45 of a level: must round back to the level. Then out-of-range values.
    jitter = (torch.rand(levels.shape, generator=torch.Generator().manual_seed(0)) - 0.5) * 0.9
    images = (levels + jitter) / 127.5 - 1.0
    images[0, 0, 0, :4] = torch.tensor([-1.5, -1.0001, 1.0001, 7.0])
    tok.decoder = Constant(images)
    out = tok.decode(torch.zeros(2, 8, 8, 8))
    expected = levels.movedim(1, -1).to(torch.uint8).expand(2, -1, -1, -1).clone()
    expected[:, 0, :4, 0] = torch.tensor([0, 0, 255, 255], dtype=torch.uint8)
    assert torch.equal(out, expected)


def test_fit_normalization_gives_zero_mean_unit_std() -> None:
    tok = make_tokenizer()
    frames = random_frames(16)
    raw = tok.encode_images(to_images(frames), normalize=False)
    assert raw.mean((0, 1, 2)).abs().max() > 0.01  # not normalised already, or the test is moot
    tok.fit_normalization(raw)
    latents = tok.encode(frames)
    torch.testing.assert_close(latents.mean((0, 1, 2)), torch.zeros(8), atol=1e-4, rtol=0)
    torch.testing.assert_close(latents.std((0, 1, 2)), torch.ones(8), atol=1e-4, rtol=0)
    # Normalised and raw latents decode to the same images.
    torch.testing.assert_close(tok.decode_images(latents), tok.decode_images(raw, normalized=False),
                               atol=1e-4, rtol=1e-4)


def test_state_dict_round_trip_includes_statistics(tmp_path: Path) -> None:
    tok = make_tokenizer(seed=0)
    frames = random_frames(4)
    tok.fit_normalization(tok.encode_images(to_images(frames), normalize=False))
    assert {"latent_mean", "latent_std"} <= set(tok.state_dict())
    save_file({k: v.contiguous() for k, v in tok.state_dict().items()}, str(tmp_path / "tok.safetensors"))
    fresh = make_tokenizer(seed=1)
    fresh.load_state_dict(load_file(str(tmp_path / "tok.safetensors")))
    latents = tok.encode(frames)
    assert torch.equal(fresh.encode(frames), latents)
    assert torch.equal(fresh.decode(latents), tok.decode(latents))


def test_bf16_matches_fp32() -> None:
    tok = make_tokenizer()
    frames = random_frames(4)
    tok.fit_normalization(tok.encode_images(to_images(frames), normalize=False))
    latents = tok.encode(frames)
    images = tok.decode_images(latents)
    tok16 = copy.deepcopy(tok).to(torch.bfloat16)
    assert tok16.dtype == torch.bfloat16 and tok16.latent_std.dtype == torch.float32  # stats stay fp32
    lat16 = tok16.encode(frames)
    assert lat16.dtype == torch.float32
    assert (lat16 - latents).abs().max() < 0.05 * latents.std()
    assert (tok16.decode_images(latents) - images).abs().max() < 0.05 * images.std()
    assert (tok16.decode(latents).int() - tok.decode(latents).int()).abs().max() <= 4
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 weights under the caller's autocast
        auto = tok.encode(frames)
    assert auto.dtype == torch.float32 and (auto - latents).abs().max() < 0.05 * latents.std()


def test_tiny_model_learns_a_2x2_sprite() -> None:
    """The bottleneck (64x64x3 -> 8x8x8) must not erase a few-pixel sprite: overfit a handful of
    frames and find every sprite back at its place."""
    torch.manual_seed(0)
    tok = Tokenizer(tokenizer_config("tiny"))
    frames, pos = sprite_frames(4)
    images = to_images(frames)
    sprite = (images != images[..., :1, :1]).any(-3, keepdim=True).float()  # (n, 1, 64, 64)
    steps = 200
    opt = torch.optim.Adam(tok.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        recon, _ = tok(images)
        se = (recon - images).pow(2)
        # Background and sprite weigh the same: with a plain mean the 4 sprite pixels are a
        # 0.1 % term, and 200 steps only learn the background.
        loss = se.mean() + (se * sprite).sum() / (3 * sprite.sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    tok.eval()
    tok.fit_normalization(tok.encode_images(images, normalize=False))
    out = tok.decode(tok.encode(frames)).float()
    psnr = lambda se: 10 * torch.log10(255.0**2 / se.mean())  # noqa: E731
    se = (out - frames.float()).pow(2)
    assert psnr(se[sprite[:, 0].bool()]) > 30.0  # the sprite's own pixels (about 40 dB in practice)
    # Whole frames: about 22 dB after 200 steps (a faint glow around the sprite is left), 8 at step 0.
    assert psnr(se) > 18.0
    for b, (r, c) in zip(out.sum(-1), pos.tolist()):  # brightness (n, 64, 64)
        found = divmod(int(b.argmax()), 64)  # the brightest pixel is the sprite's, to 1 px
        assert r - 1 <= found[0] <= r + 2 and c - 1 <= found[1] <= c + 2, (found, (r, c))


def test_config_validation_and_registry() -> None:
    cfg = TokenizerConfig()
    assert cfg.frame_shape == (64, 64, 3) and cfg.latent_shape == (8, 8, 8) and cfg.resolutions == (32, 16, 8)
    assert set(TOKENIZER_SIZES) >= {"tiny", "small"} and tokenizer_config() == TOKENIZER_SIZES["small"]
    assert tokenizer_config("tiny", latent_channels=4).latent_channels == 4
    assert TokenizerConfig(channels=[8, 16, 32]).channels == (8, 16, 32)  # lists (hydra) become tuples
    with pytest.raises(ValueError, match="power of two"):
        TokenizerConfig(image_size=48)
    with pytest.raises(ValueError, match="one entry per resolution"):
        TokenizerConfig(latent_size=16)
    with pytest.raises(KeyError, match="known sizes"):
        tokenizer_config("huge")
    tok = make_tokenizer()
    with pytest.raises(ValueError, match=r"\(\.\.\., H, W, 3\)"):
        tok.encode(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        tok.encode(torch.zeros(64, 64, 3))
    with pytest.raises(ValueError, match=r"\(\.\.\., h, w, c\)"):
        tok.decode(torch.zeros(2, 8, 8, 4))


def test_subpixel_upsampling_starts_as_nearest_and_old_configs_keep_nearest():
    import torch.nn.functional as F

    from worldmodel.tokenizer import SubpixelUpsample, Upsample

    up = SubpixelUpsample(8, 4)
    x = torch.randn(2, 8, 5, 5)
    # ICNR: every child of a cell starts with the same filters, i.e. conv then nearest x2
    same = F.interpolate(F.conv2d(F.silu(x), up.conv.weight[::4], up.conv.bias[::4], padding=1),
                         scale_factor=2.0, mode="nearest")
    assert torch.allclose(up(x), same, atol=1e-6)
    fine = Tokenizer(tokenizer_config("fine"))
    assert any(isinstance(m, SubpixelUpsample) for m in fine.decoder.modules())
    frames = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    assert fine.encode(frames).shape == (2, 16, 16, 8) and fine.decode(fine.encode(frames)).shape == frames.shape
    # a config written before the option existed (no "upsample" key) builds the nearest decoder
    old = {k: v for k, v in vars(tokenizer_config("small")).items() if k != "upsample"}
    assert any(isinstance(m, Upsample) for m in Tokenizer(TokenizerConfig(**old)).decoder.modules())
    with pytest.raises(ValueError, match="upsample"):
        TokenizerConfig(upsample="bilinear")
