"""Shared test fixtures: headless SDL, small thread count, randomised tiny models."""

import os

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def one_thread():
    """Tiny models are dominated by per-op overhead: one thread is faster, and far steadier on a
    busy CPU (two threads hand work back and forth). Restored afterwards. Use it per module with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Give every parameter random values so zero-initialised heads/gates do not hide bugs.

    Norm weights stay near 1 so activations keep a sane scale.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            if "norm" in name:
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
    return model


def make_tiny_world(num_actions: int = 4, frames_per_block: int = 1, seed: int = 0,
                    context: int = 6, image_size: int = 32):
    """A randomly initialised tiny world (DiT + tokenizer + reward heads) with real-ish context."""
    from worldmodel.checkpoint import World
    from worldmodel.dit import DiT, DiTConfig
    from worldmodel.reward import RewardConfig, RewardHeads
    from worldmodel.tokenizer import Tokenizer, TokenizerConfig

    latent = image_size // 8
    tok = Tokenizer(TokenizerConfig(image_size=image_size, latent_size=latent, latent_channels=4,
                                    channels=(8, 8, 16), encoder_blocks=(0, 0, 1),
                                    decoder_blocks=(0, 0, 1)))
    dit = DiT(DiTConfig(width=32, depth=2, heads=2, latent_size=latent, latent_channels=4,
                        num_actions=num_actions, frames_per_block=frames_per_block,
                        max_frames=32, train_frames=8))
    reward = RewardHeads(RewardConfig(latent_size=latent, latent_channels=4, num_actions=num_actions,
                                      hidden=16))
    for i, m in enumerate((tok, dit, reward)):
        randomize(m, seed=seed + i, std=0.1)
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (context, image_size, image_size, 3), generator=g, dtype=torch.uint8)
    actions = torch.randint(0, num_actions, (context,), generator=g)
    actions[0] = -1
    return World(dit=dit.eval(), tokenizer=tok.eval(), reward=reward.eval(),
                 action_names=[f"a{i}" for i in range(num_actions)],
                 engine={"steps": 2, "sink": 1, "dtype": "float32", "seed": 0},
                 info={"name": "tiny", "fps": 15}, context_frames=frames, context_actions=actions)
