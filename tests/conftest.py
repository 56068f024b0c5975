"""Shared test fixtures: headless SDL, small thread count, randomised tiny models."""

import os

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


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
