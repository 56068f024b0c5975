"""`python -m envs.strip`: a still of a world's dream, as a labelled PNG strip.

    python -m envs.strip --world breakout --seed 1 --every 4 --out docs/img/breakout.png \\
        --plan "fire*4,right*12,left*16" --plan "fire*4,left*12,right*16"
    python -m envs.strip --world doom --seed 2 --every 3 --out keys.png \\
        --plan "turn_left*12" --plan "turn_right*12" --plan "forward*12"

Each ``--plan`` is one row: the world is reset from the same context (``reset(seed=S)``), the plan's
actions are played one per frame, and every ``--every``-th frame is kept, labelled with its index
and the action that made it (frame 0 is the last context frame). Several plans from one context
show whether the keys steer the world. A plan is ``name*count`` items separated by commas; names
are the world's action names (case-insensitive), printed when one is unknown.

The README's Breakout still is made with it, so it can be made again after the world changes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from envs.world_model_env import WorldModelEnv


def parse_plan(text: str, action_names: list[str]) -> list[int]:
    """"noop*4,right*12" -> action ids; ValueError naming the bad item and the valid names."""
    lookup = {name.lower(): i for i, name in enumerate(action_names)}
    ids: list[int] = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, count = item.partition("*")
        if name.lower() not in lookup:
            raise ValueError(f"unknown action {name!r} in plan {text!r}: this world's actions are "
                             f"{', '.join(action_names)}")
        try:
            n = int(count) if count else 1
        except ValueError:
            n = -1
        if n < 1:
            raise ValueError(f"bad count in {item!r}: write name*N with N >= 1, e.g. {name}*4")
        ids += [lookup[name.lower()]] * n
    if not ids:
        raise ValueError(f"empty plan {text!r}: write e.g. \"{action_names[0].lower()}*8\"")
    return ids


def dream_row(env: WorldModelEnv, plan: list[int], seed: int) -> list[tuple[np.ndarray, str]]:
    """(frame, label) for the context's last frame and every frame the plan makes."""
    obs, _ = env.reset(seed=seed)
    frames = [(obs, "start")]
    for action in plan:
        obs, *_ = env.step(action)
        frames.append((obs, env.action_names[action].lower()))
    return frames


def render_strip(rows: list[list[tuple[np.ndarray, str]]], every: int, scale: int) -> np.ndarray:
    """Tile every `every`-th frame of each row, scaled up (nearest) with a caption band below."""
    band = 14
    tiles = []
    for row in rows:
        cells = []
        for index in range(0, len(row), every):
            frame, label = row[index]
            big = cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
            cell = np.zeros((big.shape[0] + band, big.shape[1] + 2, 3), np.uint8)  # 2-pixel gutter
            cell[: big.shape[0], : big.shape[1]] = big
            cv2.putText(cell, f"{index} {label}", (2, cell.shape[0] - 4), cv2.FONT_HERSHEY_SIMPLEX,
                        0.33, (255, 255, 255), 1, cv2.LINE_AA)
            cells.append(cell)
        tiles.append(np.concatenate(cells, axis=1))
    width = max(t.shape[1] for t in tiles)
    tiles = [np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0))) for t in tiles]
    return np.concatenate(tiles, axis=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m envs.strip",
                                description="A labelled PNG strip of a world's dream under action plans.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--world", help="a shipped world by name (default: the default world)")
    src.add_argument("--checkpoint", help="a world checkpoint file (.safetensors)")
    p.add_argument("--plan", action="append", required=True, help="one row: name*N,name*N,... (repeatable)")
    p.add_argument("--every", type=int, default=4, help="keep every N-th frame")
    p.add_argument("--seed", type=int, default=0, help="reset(seed=...): picks the context clip and the noise")
    p.add_argument("--steps", type=int, choices=(1, 2, 4), help="denoising steps (default: the world's)")
    p.add_argument("--scale", type=int, default=2, help="pixel zoom")
    p.add_argument("--out", required=True, help="PNG file to write")
    args = p.parse_args(argv)
    if args.every < 1 or args.scale < 1:
        p.error("--every and --scale must be >= 1")
    try:
        env = WorldModelEnv(checkpoint=args.checkpoint, world=args.world, steps=args.steps, horizon=None,
                            timing_in_info=False)
        plans = [parse_plan(text, env.action_names) for text in args.plan]
    except (ValueError, OSError) as err:  # bad world file or plan: say what to fix
        print(f"strip: {err}", file=sys.stderr)
        return 2
    strip = render_strip([dream_row(env, plan, args.seed) for plan in plans], args.every, args.scale)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), cv2.cvtColor(strip, cv2.COLOR_RGB2BGR)):
        print(f"strip: could not write {out} (is the extension .png and the folder writable?)", file=sys.stderr)
        return 2
    print(f"wrote {out}: {len(plans)} row(s) x {strip.shape[1]}x{strip.shape[0]} px, world {env.world_name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
