"""``python -m record``: collect, inspect and view action-video datasets.

    python -m record games
    python -m record collect --env breakout --controller random --frames 600 --out runs/breakout
    python -m record collect --env doom --controller explorer --frames 200000 --out DIR --resume
    python -m record collect --env breakout --controller human --out DIR
    python -m record stats DIR [--json]
    python -m record view DIR

Bad input (unknown game, missing directory, empty dataset, no display) gets one line naming
the problem and the fix, and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from episodes.frames import parse_size
from envs.registry import SPECS, UnknownGameError, UnsupportedGameError
from record.collect import CONTROLLERS, CollectConfig, collect
from record.controllers import parse_repeat
from episodes.codecs import CODECS
from episodes.reader import DatasetError
from record.stats import compute_stats, format_stats

EXIT_BAD_INPUT = 2  # the command could not run as asked
EXIT_NOTHING_READABLE = 1  # the dataset exists but no chunk of it can be read


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _size(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _repeat(text: str) -> tuple[int, int]:
    try:
        return parse_repeat(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m record",
        description="Record games as action-video datasets (see episodes/FORMAT.md), and inspect them.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("games", help="list the shipped games", description="List the shipped game specs.")

    c = sub.add_parser(
        "collect",
        help="record episodes of a game",
        description="Record episodes of a game into DIR. Rerunning into the same DIR adds episodes "
        "(never overwrites). Ctrl-C flushes the current chunk, closes the episode and exits 0.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    c.add_argument("--env", help=f"game name ({', '.join(SPECS)}) or a Gymnasium id (e.g. ALE/Pong-v5)")
    c.add_argument("--controller", choices=CONTROLLERS, default="random", help="who chooses the actions")
    c.add_argument("--out", type=Path, required=True, help="dataset directory (created if missing)")
    c.add_argument(
        "--frames", type=_positive, help="frames to record (with --resume: the total wanted in DIR)"
    )
    c.add_argument("--episodes", type=_positive, help="episodes to record")
    c.add_argument("--workers", type=_positive, default=1, help="processes recording in parallel")
    c.add_argument(
        "--seed", type=int, help="base seed: the k-th episode in DIR gets seed+k (default: random)"
    )
    c.add_argument("--size", type=_size, help="store frames at HxW instead of the native size (e.g. 64x64)")
    c.add_argument("--codec", choices=list(CODECS), default="png", help="frame compression")
    c.add_argument(
        "--repeat",
        type=_repeat,
        default=(4, 4),
        metavar="N|LOW-HIGH",
        help="random controller: frames each action is held",
    )
    c.add_argument(
        "--noise", type=float, default=0.15, help="tracker controller: share of decisions that hold a random action"
    )
    c.add_argument("--max-episode-frames", type=_positive, help="cut episodes at this length")
    c.add_argument(
        "--chunk-frames", type=_positive, default=256, help="frames per chunk file (the most a crash loses)"
    )
    c.add_argument(
        "--chunk-seconds", type=float, default=10.0, help="also flush a chunk after this many seconds"
    )
    c.add_argument("--resume", action="store_true", help="count frames already in DIR towards --frames")
    c.add_argument(
        "--replay",
        type=Path,
        metavar="EPISODE_DIR",
        help="replay controller: the recorded episode to play back (same game and seed)",
    )
    c.add_argument("--scale", type=_positive, help="human controller: window upscale (default: about 640 px)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser("stats", help="summarise a dataset", description="Summarise a dataset directory.")
    s.add_argument("dir", type=Path, help="dataset directory")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")

    v = sub.add_parser(
        "view",
        help="step through episodes",
        description="Step through recorded episodes: Right/Left frame (Shift: 10), Space play/pause, "
        "Down/Up next/previous episode, Home/End, Esc/Q quit.",
    )
    v.add_argument("dir", type=Path, help="dataset directory")
    v.add_argument("--episode", type=int, default=0, help="episode index to open at")
    v.add_argument("--scale", type=_positive, help="window upscale (default: about 640 px)")
    v.add_argument("--max-steps", type=_positive, help="quit after this many frames drawn (headless runs)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "games":
            for spec in SPECS.values():
                print(f"{spec.name:10s} {spec.gym_id:34s} {spec.fps:5.1f} fps  {spec.description}")
            return 0
        if args.command == "collect":
            return _collect(args)
        if args.command == "stats":
            return _stats(args)
        return _view(args)
    except (UnknownGameError, UnsupportedGameError, DatasetError, ValueError, RuntimeError, OSError) as err:
        print(f"record {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _collect(args: argparse.Namespace) -> int:
    if args.env is None and args.replay is None:
        raise ValueError("which game? give --env NAME (e.g. --env breakout), or --replay EPISODE_DIR")
    if args.replay is not None:
        args.controller = "replay"
    cfg = CollectConfig(
        env=args.env or "",
        out=args.out,
        controller=args.controller,
        frames=args.frames,
        episodes=args.episodes,
        workers=args.workers,
        seed=args.seed,
        size=args.size,
        codec=args.codec,
        repeat=args.repeat,
        noise=args.noise,
        max_episode_frames=args.max_episode_frames,
        chunk_frames=args.chunk_frames,
        chunk_seconds=args.chunk_seconds,
        resume=args.resume,
        replay=args.replay,
        scale=args.scale,
        progress=not args.no_progress,
    )
    summary = collect(cfg)
    print(json.dumps(summary))
    return 0


def _stats(args: argparse.Namespace) -> int:
    stats = compute_stats(args.dir)
    if stats["episodes"] == 0:
        raise DatasetError(
            f"no episodes in {args.dir}: record some with `python -m record collect --out {args.dir} ...`"
        )
    print(json.dumps(stats, indent=1) if args.json else format_stats(stats))
    if stats["frames"] == 0:
        print(f"record stats: error: nothing in {args.dir} is readable (see bad_chunks)", file=sys.stderr)
        return EXIT_NOTHING_READABLE
    return 0


def _view(args: argparse.Namespace) -> int:
    # Imported here: the viewer starts SDL, which collect and stats do not need.
    from record.viewer import view

    state = view(args.dir, episode=args.episode, scale=args.scale, max_steps=args.max_steps)
    print(f"viewed up to episode {state.episode}, frame {state.frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
