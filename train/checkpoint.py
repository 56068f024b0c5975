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
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train import UsageError

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


DAMAGED = ".damaged"  # suffix an unreadable checkpoint is renamed to: kept, but no longer resumed from


def load_newest_readable(run_dir: Path) -> tuple[Path | None, dict[str, Any] | None, list[tuple[Path, str]]]:
    """The newest checkpoint that loads, its state, and the newer ones that did not, each with why
    (newest first). Writes are atomic, but a file can still be cut short by a full disk, a copy,
    or a failing drive; an older checkpoint beside it is still worth resuming from.
    (None, None, []) when there is no checkpoint; UsageError when none of them is readable."""
    bad: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            state = load_checkpoint(path)
            if not isinstance(state, dict) or "step" not in state:
                raise ValueError("not a training checkpoint: no 'step' in it")
            return path, state, bad
        except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
            # torch's weights-only message advises weights_only=False, which is not the fix here
            why = "not a torch checkpoint" if isinstance(e, pickle.UnpicklingError) else \
                (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            bad.append((path, f"truncated or damaged: {why}"))
    if bad:
        raise UsageError(
            f"no readable checkpoint in {checkpoint_dir(run_dir)}: {', '.join(p.name for p, _ in bad[::-1])} "
            f"cannot be read ({bad[0][1]}); to start over from step 0 move them out of that folder, or "
            "pass a new run_dir=")
    return None, None, bad


def set_aside(path: Path) -> Path:
    """Rename an unreadable checkpoint to <name>.damaged (not deleted: nothing is lost) so that
    later resumes and the keep-the-newest-K pruning stop counting it."""
    target = path.with_name(path.name + DAMAGED)
    os.replace(path, target)
    return target


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
