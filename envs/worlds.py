"""Where world checkpoints are found: the shipped worlds by name, or any file by path.

Shipped worlds live inside the installed ``worldmodel`` package as
``worldmodel/worlds/<name>.safetensors`` (declared as package data), so ``python play.py`` and
``gymnasium.make("WorldModel-v0")`` work with no path at all once a trained world ships.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from worldmodel.checkpoint import CheckpointError

DEFAULT_WORLD = "breakout"  # `python play.py` opens it; --world doom for the first-person world, which
# does not yet hold up under play (it drifts into a red blur after a few seconds of walking)


def worlds_dir() -> Path:
    """The folder of shipped worlds inside the installed ``worldmodel`` package."""
    return Path(str(resources.files("worldmodel"))) / "worlds"


def shipped_worlds() -> list[str]:
    """Names of the worlds that ship with this install (may be empty)."""
    folder = worlds_dir()
    return sorted(p.stem for p in folder.glob("*.safetensors")) if folder.is_dir() else []


def world_path(name: str) -> Path:
    """The checkpoint of the shipped world ``name``; a clear error if it is not installed."""
    path = worlds_dir() / f"{name}.safetensors"
    if path.is_file():
        return path
    have = shipped_worlds()
    listing = f"shipped worlds: {', '.join(have)}" if have else "no trained worlds ship with this install yet"
    raise CheckpointError(
        f"no shipped world named {name!r} (looked for {path}; {listing}). Pass a world checkpoint "
        "file instead: checkpoint='path/to/world.safetensors' (env) or --checkpoint FILE (play.py)."
    )


def default_world_path() -> Path:
    """The default world's checkpoint (``worldmodel/worlds/<DEFAULT_WORLD>.safetensors``)."""
    return world_path(DEFAULT_WORLD)


def resolve_checkpoint(checkpoint: str | Path | None = None, world: str | None = None) -> Path:
    """A checkpoint path from an explicit file, a shipped world's name, or the default world."""
    if checkpoint is not None and world is not None:
        raise ValueError("give either a checkpoint file or a world name, not both")
    if checkpoint is not None:
        return Path(checkpoint)
    return world_path(world) if world is not None else default_world_path()
