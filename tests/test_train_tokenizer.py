"""The tokenizer stage end to end on synthetic sprites, and the latent cache built from its export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from train.app import compose_config
from train.data import SyntheticConfig, SyntheticSource, build_batches
from train.latents import FILE, LatentSource, tokenizer_key
from train.loop import train
from train import UsageError
from train.objectives.tokenizer import (TokenizerStageConfig, WEIGHTS, foreground_mask, ghost_pixels,
                                        load_tokenizer, motion_mask, reconstruction_loss)

STEPS = 24


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    cfg = compose_config([
        "stage=tokenizer", "data=synthetic", "model=tiny", f"runs_root={root}", f"max_steps={STEPS}",
        "stage.lr=3e-3", "stage.warmup_steps=5", "stage.norm_batches=2", "data.batch_size=12",
        "eval_every=12", "log_every=4", "progress=false", "device=cpu"])
    return train(cfg)


def test_tokenizer_loss_decreases_and_exports(tokenizer_run: Path) -> None:
    records = [json.loads(line) for line in (tokenizer_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["tokenizer/loss"] for r in records if "tokenizer/loss" in r]
    assert losses[-1] < 0.8 * losses[0], losses
    evals = [r for r in records if "eval/psnr" in r]
    assert [r["step"] for r in evals] == [12, 24] and evals[-1]["eval/psnr"] > evals[0]["eval/psnr"]
    # The export loads on its own and its latents are normalised on the data.
    tok = load_tokenizer(tokenizer_run / "export")
    src = SyntheticSource(SyntheticConfig(), 64)
    frames = torch.cat([src.clip(i, 0, 16)["frames"] for i in range(8)])
    latents = tok.encode(frames)
    assert latents.shape == (128, 8, 8, tok.config.latent_channels)
    assert latents.mean((0, 1, 2)).abs().max() < 0.5
    assert ((latents.std((0, 1, 2)) - 1).abs() < 0.5).all()
    assert tok.decode(latents).dtype == torch.uint8


def test_foreground_term_sees_a_missing_sprite() -> None:
    """A 2x2 ball lost from a 64x64 frame barely moves L1, but dominates the foreground term."""
    target = -torch.ones(1, 3, 64, 64)
    target[..., 30:32, 30:32] = 1.0
    recon = -torch.ones(1, 3, 64, 64)  # the background only
    assert foreground_mask(target, 0.1).sum() == 4
    cfg = TokenizerStageConfig(l1=1.0, edge=0.0, foreground=4.0)
    loss, logs = reconstruction_loss(recon, target, cfg)
    assert logs["l1"] < 0.002 and logs["fg_l1"] == pytest.approx(2.0)
    assert loss > 1000 * logs["l1"]


def test_foreground_union_sees_a_ghost_sprite() -> None:
    """A 2x2 ghost ball drawn on an empty frame: the target has no foreground, so only the union
    with the reconstruction's foreground lets the term see it (wrong by 2 in 3 channels)."""
    target = -torch.ones(1, 3, 64, 64)
    recon = target.clone()
    recon[..., 30:32, 30:32] = 1.0
    _, union = reconstruction_loss(recon, target, TokenizerStageConfig(edge=0.0))
    _, plain = reconstruction_loss(recon, target, TokenizerStageConfig(edge=0.0, foreground_union=False))
    assert union["fg_l1"] == pytest.approx(2.0) and union["fg_frac"] == pytest.approx(4 / 4096)
    assert plain["fg_l1"] == 0.0 and plain["l1"] == union["l1"]
    # the evaluation counts those 4 pixels, and none for the frame itself
    assert ghost_pixels(recon, target, 0.1) == 4 and ghost_pixels(target, target, 0.1) == 0


def test_motion_term_sees_a_ball_that_the_foreground_term_drowns() -> None:
    """Breakout-like clip of 3 frames: a static brick band (a quarter of the frame, so foreground)
    and a 1-pixel ball moving one pixel right per frame. A reconstruction that keeps the bricks and
    drops the ball: the foreground term averages the miss over 1,024 brick pixels, the motion term
    over the pixels that move, where it is the whole error."""
    clip = -torch.ones(1, 3, 3, 64, 64)
    clip[:, :, :, 8:24, :] = 0.5                       # bricks (static)
    for t in range(3):
        clip[0, t, :, 40, 10 + t] = 1.0                # the ball at x = 10, 11, 12
    moving = motion_mask(clip, 0.1)
    # frame 0 moves at x 10, 11 (vs frame 1); frame 1 at 10, 11, 12 (vs both); frame 2 at 11, 12
    assert moving.shape == (1, 3, 1, 64, 64)
    assert [int(moving[0, t].sum()) for t in range(3)] == [2, 3, 2]
    assert moving[0, 1, 0, 40, 10:13].tolist() == [1.0, 1.0, 1.0]
    recon = clip.clone()
    recon[:, :, :, 40, 8:16] = -1.0                    # no ball anywhere
    cfg = TokenizerStageConfig(l1=0.0, edge=0.0, foreground=1.0, motion=1.0)
    images, target = recon.flatten(0, 1), clip.flatten(0, 1)
    _, logs = reconstruction_loss(images, target, cfg, moving.flatten(0, 1))
    # the ball pixels are wrong by 2 in all 3 channels: 3 of the 7 moving pixels (one per frame)
    assert logs["motion_l1"] == pytest.approx(2.0 * 3 / 7)
    assert logs["fg_l1"] == pytest.approx(2.0 * 3 / (3 * (16 * 64 + 1)), rel=1e-5)
    assert logs["motion_l1"] > 300 * logs["fg_l1"]
    # without a mask the term is absent, so a clip_len-1 stage costs what it did before
    loss, plain = reconstruction_loss(images, target, cfg)
    assert "motion_l1" not in plain and loss == pytest.approx(plain["fg_l1"].item())


def test_motion_term_needs_clips_of_two_frames(tmp_path: Path) -> None:
    cfg = compose_config(["stage=tokenizer", "data=synthetic", "model=tiny", f"runs_root={tmp_path}",
                          "max_steps=1", "stage.motion=4", "data.clip_len=1", "progress=false", "device=cpu"])
    with pytest.raises(UsageError, match="data.clip_len=2"):
        train(cfg)


def test_latent_cache_is_keyed_by_tokenizer_weights(tokenizer_run: Path, tmp_path: Path) -> None:
    export = tokenizer_run / "export"
    cfg = compose_config(["stage=tokenizer", "data=synthetic", f"data.tokenizer={export}", "data.latents=true",
                          f"data.cache_dir={tmp_path / 'cache'}", "data.clip_len=4", "data.batch_size=2",
                          "data.synthetic.episodes=3", "data.synthetic.episode_len=8"])
    kw = dict(seed=0, rank=0, world_size=1, device=torch.device("cpu"), run_dir=tmp_path)
    batch = next(build_batches(cfg.data, **kw))
    assert batch["latents"].shape == (2, 4, 8, 8, 8) and batch["latents"].dtype == torch.float32
    assert batch["actions"].shape == (2, 4)
    first = next((tmp_path / "cache").iterdir())
    assert first.name.endswith(tokenizer_key(export))
    # The cached latents are the tokenizer's encoding of the same frames.
    tok = load_tokenizer(export)
    src = SyntheticSource(SyntheticConfig(episodes=3, episode_len=8), 64)
    cached = LatentSource(first, src.action_names).clip(1, 2, 4)
    assert torch.allclose(cached["latents"], tok.encode(src.clip(1, 2, 4)["frames"]), atol=2e-2)
    assert torch.equal(cached["actions"], src.clip(1, 2, 4)["actions"])
    # A retrained tokenizer (other weights) gets a new cache; the stale one is removed.
    changed = tmp_path / "export2"
    changed.mkdir()
    (changed / "tokenizer.json").write_text((export / "tokenizer.json").read_text())
    weights = load_file(str(export / WEIGHTS))
    weights["latent_std"] = weights["latent_std"] * 2
    save_file(weights, str(changed / WEIGHTS))
    cfg.data.tokenizer = str(changed)
    next(build_batches(cfg.data, **kw))
    dirs = list((tmp_path / "cache").iterdir())
    assert len(dirs) == 1 and dirs[0] != first and (dirs[0] / FILE).exists()
    assert dirs[0].name.endswith(tokenizer_key(changed))


def test_a_valid_latent_cache_is_used_without_decoding_images(tokenizer_run: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import episodes.reader
    from tests.test_train_data import write_dataset
    from train.data import build_data

    data = tmp_path / "data"
    write_dataset(data, episodes=2)
    cfg = compose_config([f"data={data}", f"data.tokenizer={tokenizer_run / 'export'}", "data.latents=true",
                          f"data.cache_dir={tmp_path / 'cache'}", "data.hold_out=false"])
    kw = dict(rank=0, world_size=1, device=torch.device("cpu"), run_dir=tmp_path)
    first = build_data(cfg.data, **kw)
    assert sorted(first.episode_lengths()) == [5, 10]
    decoded = []
    real_unpack = episodes.reader.unpack_frames
    monkeypatch.setattr(episodes.reader, "unpack_frames", lambda *a: decoded.append(1) or real_unpack(*a))
    again = build_data(cfg.data, **kw)  # the cache matches the dataset: no image is decoded
    assert decoded == [] and torch.equal(again.clip(1, 0, 5)["latents"], first.clip(1, 0, 5)["latents"])
    write_dataset(data, episodes=1, length=12, damage=False)  # one more episode: the cache is stale
    grown = build_data(cfg.data, **kw)
    assert decoded and sorted(grown.episode_lengths()) == [5, 10, 12]
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_decoder_only_fine_tune_keeps_the_latent_space(tokenizer_run: Path, tmp_path: Path) -> None:
    from train.assemble import swap_decoder
    from worldmodel.checkpoint import CheckpointError, World
    from worldmodel.dit import DiT, DiTConfig

    base = tokenizer_run / "export"
    cfg = compose_config([
        "stage=tokenizer", "data=synthetic", "model=tiny", f"runs_root={tmp_path}", "max_steps=6",
        f"init_from={base}", "stage.decoder_only=true", "stage.lr=3e-3", "stage.warmup_steps=1",
        "data.batch_size=12", "progress=false", "device=cpu"])
    tuned_dir = train(cfg) / "export"
    tuned = load_tokenizer(tuned_dir)
    old = load_tokenizer(base)
    a, b = old.state_dict(), tuned.state_dict()
    # encoder and statistics bit-identical (latents of every trained model stay valid) ...
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("encoder.", "latent_")))
    # ... the decoder moved
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("decoder."))
    # A world takes the fine-tuned decoder; a tokenizer with another encoder is refused.
    dit = DiT(DiTConfig(width=32, depth=1, heads=2, num_actions=2, latent_channels=old.config.latent_channels,
                        latent_size=old.config.latent_size))
    world = World(dit=dit, tokenizer=old, action_names=["a", "b"])
    swap_decoder(world, tuned_dir)
    assert all(torch.equal(v, b[k]) for k, v in world.tokenizer.state_dict().items())
    other = compose_config([
        "stage=tokenizer", "data=synthetic", "model=tiny", f"runs_root={tmp_path / 'other'}", "max_steps=2",
        "seed=1", "data.batch_size=4", "progress=false", "device=cpu"])
    with pytest.raises(CheckpointError, match="decoder fine-tune"):
        swap_decoder(world, train(other) / "export")


def test_scale_equivariance_adds_the_pooled_reconstruction_loss() -> None:
    from torch.nn.functional import avg_pool2d

    from train.objectives import TrainContext
    from train.objectives.tokenizer import TokenizerObjective
    from train.app import compose_config

    model = compose_config(["model=tiny"]).model
    ctx = TrainContext(device=torch.device("cpu"), dtype=torch.float32, rank=0, world_size=1,
                       run_dir=Path("."), init_from=None, seed=0,
                       model={"tokenizer": dict(model.tokenizer)})
    cfg = TokenizerStageConfig(scale_equivariance=0.5)
    obj = TokenizerObjective(cfg, ctx)
    frames = torch.randint(0, 255, (2, 1, 64, 64, 3), dtype=torch.uint8)
    loss, logs = obj.loss("tokenizer", {"frames": frames}, 0, {"tokenizer": obj.tokenizer})
    # by hand: the full-size loss + 0.5 x the loss of the decoded 2x2-pooled latents vs the pooled frame
    images = frames.flatten(0, 1).movedim(-1, -3).float() / 127.5 - 1
    recon, raw = obj.tokenizer(images)
    z = raw.permute(0, 3, 1, 2)
    small = obj.tokenizer.decoder(avg_pool2d(z, 2).contiguous(memory_format=torch.channels_last))
    assert small.shape == (2, 3, 32, 32)
    full, _ = reconstruction_loss(recon, images, cfg)
    pooled, _ = reconstruction_loss(small, avg_pool2d(images, 2), cfg)
    expect = full + 0.5 * pooled + cfg.latent_l2 * raw.pow(2).mean()
    torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-6)
    assert logs["se_loss"] == pytest.approx(pooled.item(), rel=1e-5)


def test_latent_roughness_is_one_for_white_noise_and_zero_for_smooth_maps() -> None:
    from train.objectives.tokenizer import latent_roughness

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(64, 8, 8, 4, generator=g)
    assert latent_roughness(noise).item() == pytest.approx(1.0, abs=0.05)
    smooth = torch.randn(64, 8, 1, 4, generator=g).expand(64, 8, 8, 4)  # constant along w
    assert latent_roughness(smooth).item() == pytest.approx(0.0, abs=1e-6)
