"""Assemble the shippable world file from a pipeline's stage exports.

``python -m train.assemble --runs-root runs/doom --data data/doom --out worldmodel/worlds/doom.safetensors``

The DMD student (its export's world: DiT + tokenizer), the reward heads of the ``rewards`` stage,
the dataset's game / fps / keymap, the stages' wall-clock, and a few dozen *real* context frames
(pixels straight from training episodes, never the held-out ones, cut into short clips from
different episodes so a reset can start in several places). Weights are stored in bf16 (the
tokenizer's latent statistics stay fp32) so a world fits the repository's size budget.
``stage=all`` calls the same function for ``<runs_root>/world.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from episodes.reader import Dataset, DatasetError
from train import UsageError
from train.eval.split import split_dirs
from train.loop import WALLCLOCK
from worldmodel.checkpoint import CheckpointError, load_world, save_world

CONTEXT_CLIPS = 4       # clips of real frames carried by a world
CONTEXT_CLIP_LEN = 12   # frames per clip (the engine keeps at most train_frames - 1 of them)


def dataset_info(path: str | Path | None) -> dict:
    """Game, fps and keymap from the first episode's metadata (what play.py needs of a world)."""
    if not path:
        return {}
    metas = sorted(Path(path).glob("*/meta.json"))
    if not metas:
        return {}
    meta = json.loads(metas[0].read_text())
    return {k: meta[k] for k in ("game", "gym_id", "fps", "keymap") if k in meta}


def real_context(data: str | Path, size: int, clips: int = CONTEXT_CLIPS,
                 clip_len: int = CONTEXT_CLIP_LEN, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``clips`` windows of ``clip_len`` real frames from distinct training episodes.

    Returns frames uint8 (clips * clip_len, size, size, 3) and actions int64 with -1 on each clip's
    first frame, which is how the env's context source tells clips apart.
    """
    dataset = Dataset(Path(data))
    train_dirs, _ = split_dirs(dataset)
    if not train_dirs:
        raise DatasetError(f"{data}: no training episodes to take context frames from")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_dirs))
    frames, actions = [], []
    for i in order:
        for ep in dataset.read(train_dirs[int(i)]):
            if len(ep.actions) < clip_len + 1:
                continue
            # not the very start: the first frames of an episode are often a static spawn view
            end = int(rng.integers(clip_len + 1, len(ep.actions) + 1))
            f = ep.frames[end - clip_len:end]
            if f.shape[1:3] != (size, size):
                f = np.stack([cv2.resize(x, (size, size), interpolation=cv2.INTER_AREA) for x in f])
            a = ep.actions[end - clip_len:end].astype(np.int64).copy()
            a[0] = -1
            frames.append(f)
            actions.append(a)
            break
        if len(frames) == clips:
            break
    if not frames:
        raise DatasetError(f"{data}: no training episode is longer than {clip_len} frames")
    return torch.from_numpy(np.concatenate(frames)), torch.from_numpy(np.concatenate(actions))


def swap_decoder(world, tokenizer_dir: Path) -> None:
    """Put the tokenizer of ``tokenizer_dir`` (a ``stage.decoder_only=true`` fine-tune of the
    world's own tokenizer) into ``world``. Refused unless its encoder and latent statistics equal
    the world's: the world's transformer only knows that latent space."""
    from train.objectives.tokenizer import load_tokenizer

    new = load_tokenizer(tokenizer_dir)
    old_state, new_state = world.tokenizer.state_dict(), new.state_dict()
    same = all(torch.allclose(old_state[k].float(), new_state[k].float(), atol=1e-3, rtol=1e-2)
               for k in old_state if k.startswith("encoder.") or k.startswith("latent_"))
    if not same or new.config != world.tokenizer.config:
        raise CheckpointError(f"{tokenizer_dir} is not a decoder fine-tune of this world's tokenizer "
                              "(its encoder or latent statistics differ); train one with "
                              "`python -m train stage=tokenizer stage.decoder_only=true init_from=...`")
    world.tokenizer = new


def assemble_world(dmd_export: Path, out: Path, data: str | Path | None = None,
                   rewards_export: Path | None = None, name: str | None = None,
                   timings: dict | None = None, dtype: torch.dtype = torch.bfloat16,
                   tokenizer: Path | None = None) -> Path:
    """Write ``out``: the DMD world with reward heads, dataset info, real context and timings;
    ``tokenizer``: a decoder fine-tune to ship instead of the world's own (``swap_decoder``)."""
    source = Path(dmd_export) / "world.safetensors"
    if not source.exists():
        raise CheckpointError(f"no DMD world at {source}: run the dmd stage first")
    world = load_world(source)
    if tokenizer is not None:
        swap_decoder(world, Path(tokenizer))
    if rewards_export is not None:
        from train.objectives.rewards import fitting_heads  # the rewards stage's own format

        world.reward = fitting_heads(world, rewards_export, source)
    if data is not None and Path(data).is_dir():
        size = world.tokenizer.config.image_size
        world.context_frames, world.context_actions = real_context(data, size)
    world.info = {**world.info, **dataset_info(data),
                  "name": name or (Path(data).name if data else "synthetic")}
    wallclock = Path(dmd_export) / WALLCLOCK
    if wallclock.is_file():   # the stage's own cost travels with the file, for `train.eval`'s table
        world.info["stage_wallclock"] = json.loads(wallclock.read_text())
    if timings:
        world.info["pipeline_seconds"] = timings
    out.parent.mkdir(parents=True, exist_ok=True)
    save_world(out, world, dtype=dtype)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.assemble", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs-root", required=True, type=Path, help="the pipeline's runs_root")
    p.add_argument("--data", type=Path, help="the recorded dataset (game info + real context frames)")
    p.add_argument("--dmd", default="dmd_2step_b1", help="the DMD run under runs-root (default %(default)s)")
    p.add_argument("--out", type=Path, help="output file (default <runs-root>/world.safetensors)")
    p.add_argument("--name", help="world name (default: the dataset folder's name)")
    p.add_argument("--no-rewards", action="store_true", help="ship without the rewards stage's heads")
    p.add_argument("--tokenizer", type=Path, help="a decoder-only fine-tune of the world's tokenizer to ship")
    a = p.parse_args(argv)
    rewards = None if a.no_rewards else a.runs_root / "rewards" / "export"
    if rewards is not None and not rewards.exists():
        print(f"error: no reward heads at {rewards}: run `python -m train stage=rewards ...` first, "
              "or pass --no-rewards", file=sys.stderr)
        return 2
    timing_file = a.runs_root / "pipeline_timings.json"
    timings = json.loads(timing_file.read_text()) if timing_file.exists() else None
    try:
        out = assemble_world(a.runs_root / a.dmd / "export", a.out or a.runs_root / "world.safetensors",
                             a.data, rewards, a.name, timings, tokenizer=a.tokenizer)
    except (CheckpointError, DatasetError, UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"world: {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
