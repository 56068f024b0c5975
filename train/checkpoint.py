"""Training checkpoints: one plain dict per file, written atomically, the last K kept.

Layout of `<run_dir>/checkpoints/step_<N>.pt` (torch.save of plain containers and tensors, so
`torch.load(..., weights_only=True)` reads it without any of this code's classes):

    step        int, the number of completed iterations
    networks    {name: state_dict}    every network of the objective, full (unsharded), CPU
    optimizers  {name: state_dict}    AdamW states (full under FSDP)
    ema         {name: {"decay", "shadow"}}   only for EMAs that have started
    objective   the objective's own extra state
    rng         [per-rank {torch, cuda, numpy, python}]   so a resumed run draws the same numbers
    data        [per-rank data-sampler state]
    config      the resolved config (plain dict)
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporaries of an interrupted write are ignored)."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(state: dict[str, Any], run_dir: Path, keep: int) -> Path:
    """Write `state` as step_<step>.pt: to a temporary file, fsync, then os.replace, so a crash
    leaves either the previous set of checkpoints or the new one, never a torn file. Then delete
    all but the newest `keep` checkpoints."""
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"step_{state['step']:08d}.pt"
    tmp = d / f".{path.name}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


# ----- RNG state ----------------------------------------------------------------------------
# Stored as tensors and plain ints so the checkpoint stays loadable with weights_only=True.


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": _to_lists(random.getstate()),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_to_tuples(state["python"]))


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, tuple) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x
