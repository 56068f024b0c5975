"""Recording sessions: a game, a controller and an EpisodeWriter, in one or several processes.

Each worker process (record/workers.py) plays its own copy of the game and writes its own
episodes into the same dataset directory (episode names are unique per process), so workers
never share a file. SIGINT or SIGTERM (Ctrl-C, ``kill``) stops every worker after its current
step: the chunk in flight is flushed, the episode is closed with end "interrupted", and the run
exits 0.
Rerunning into the same directory adds episodes; ``resume`` makes ``frames`` a total instead.
"""

from __future__ import annotations

import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from envs.game_env import GameEnv
from episodes.frames import Size
from envs.registry import get_spec, make_game
from record.controllers import Controller, RandomController, ReplayController
from record.explorer import ExplorerController
from record.tracker import BallTracker
from episodes.reader import Dataset, DatasetError, Episode
from record.workers import Stop, restore_signals, run_workers
from episodes.writer import (
    END_BUDGET,
    END_INTERRUPTED,
    END_TERMINATED,
    END_TRUNCATED,
    NULL_ACTION,
    EpisodeWriter,
)

CONTROLLERS = ("random", "tracker", "explorer", "human", "replay")
SEED_MODULUS = 2**31  # ALE and ViZDoom both take seeds below this


@dataclass
class CollectConfig:
    """Settings of one collection run (the ``collect`` command's flags)."""

    env: str  # game spec name or Gymnasium id
    out: Path  # dataset directory
    controller: str = "random"
    frames: int | None = None  # frames to record (a total with resume); None = no limit
    episodes: int | None = None  # episodes to record; None = no limit
    workers: int = 1
    seed: int | None = None  # base seed: episode k gets seed + k; None draws one
    size: Size | None = None  # stored frame size (h, w); None = native
    codec: str = "png"
    repeat: tuple[int, int] = (4, 4)  # random controller: frames each action is held
    noise: float = 0.15  # tracker: share of decisions that hold a random action instead
    max_episode_frames: int | None = None
    chunk_frames: int = 256
    chunk_seconds: float = 10.0
    resume: bool = False
    replay: Path | None = None  # episode directory whose actions the replay controller plays
    scale: int | None = None  # human controller window upscale
    progress: bool = True


def make_controller(cfg: CollectConfig, env: GameEnv, seed: int | None) -> Controller:
    """The controller named by ``cfg.controller`` for this game."""
    if cfg.controller == "random":
        return RandomController(env.action_space.n, cfg.repeat, seed)
    if cfg.controller == "explorer":
        return ExplorerController(env.action_names, seed)
    if cfg.controller == "tracker":
        return BallTracker(env.action_names, noise=cfg.noise, seed=seed)
    if cfg.controller == "human":
        # Imported here, not at the top: it starts SDL, which scripted worker processes don't need.
        from record.human import HumanController

        return HumanController(env.keymap, env.fps, cfg.scale, title=env.game_spec.name)
    if cfg.controller == "replay":
        if cfg.replay is None:
            raise ValueError("the replay controller needs --replay EPISODE_DIR")
        episode = _replay_source(cfg.replay)
        return ReplayController(episode.actions[1:])
    raise ValueError(f"unknown controller {cfg.controller!r}; choose one of {', '.join(CONTROLLERS)}")


def run_session(
    cfg: CollectConfig,
    frame_budget: int | None,
    episode_budget: int | None,
    episode_indices: Callable[[int], int],
    base_seed: int,
    stop: Callable[[], bool],
    report: Callable[[int, int], None],
) -> tuple[int, int]:
    """Record episodes until a budget runs out, the controller stops, or ``stop()`` is true.

    episode_indices: j -> global index of this session's j-th episode (its seed is base + index).
    report:          called with (new frames, new episodes) as recording goes on.
    Returns (frames, episodes) recorded.
    """
    replay_meta = _replay_source(cfg.replay).meta if cfg.replay else None
    spec = get_spec(replay_meta["game"] if replay_meta else cfg.env)
    env = make_game(spec, **(replay_meta or {}).get("make_kwargs", {}))
    controller = make_controller(cfg, env, base_seed)
    frames_done = episodes_done = 0
    try:
        while not stop() and (episode_budget is None or episodes_done < episode_budget):
            if frame_budget is not None and frame_budget - frames_done < 2:
                break  # an episode needs a first frame and one step
            index = episode_indices(episodes_done)
            seed = int(replay_meta["seed"]) if replay_meta else (base_seed + index) % SEED_MODULUS
            frame, info = env.reset(seed=seed)
            controller.reset(frame, seed)
            meta = _episode_meta(env, controller, seed, base_seed, index, cfg)
            writer = EpisodeWriter(
                cfg.out,
                meta,
                env.observation_space.shape,
                cfg.codec,
                cfg.size,
                cfg.chunk_frames,
                cfg.chunk_seconds,
            )
            end = None
            controller_stopped = False
            try:
                writer.add(frame, NULL_ACTION, controller=controller.name, position=info.get("position"))
                frames_done += 1
                report(1, 0)
                while end is None:
                    if stop():
                        end = END_INTERRUPTED
                    elif (frame_budget is not None and frames_done >= frame_budget) or (
                        cfg.max_episode_frames is not None and writer.frames >= cfg.max_episode_frames
                    ):
                        end = END_BUDGET
                    elif (action := controller.act(frame)) is None:
                        end, controller_stopped = controller.end_reason, True
                    else:
                        frame, reward, terminated, truncated, info = env.step(action)
                        writer.add(
                            frame,
                            action,
                            reward,
                            terminated,
                            truncated,
                            controller.name,
                            position=info.get("position"),
                        )
                        frames_done += 1
                        report(1, 0)
                        end = END_TERMINATED if terminated else END_TRUNCATED if truncated else None
            finally:
                # Whatever stops the episode, an error included, what was recorded lands.
                writer.close(end or END_INTERRUPTED)
            episodes_done += 1
            report(0, 1)
            if end == END_INTERRUPTED or controller_stopped:
                break
    finally:
        controller.close()
        env.close()
    return frames_done, episodes_done


def _episode_meta(
    env: GameEnv, controller: Controller, seed: int, base_seed: int, index: int, cfg: CollectConfig
) -> dict[str, Any]:
    spec = env.game_spec
    return {
        "game": spec.name,
        "gym_id": spec.gym_id,
        "make_kwargs": dict(spec.make_kwargs),
        "seed": seed,
        "base_seed": base_seed,
        "episode_index": index,
        "fps": env.fps,
        "action_names": list(env.action_names),
        "keymap": env.keymap.to_dict(),
        "controller": controller.name,
        "controller_config": controller.config(),
        "model_size": list(spec.model_size),
        "crop": list(spec.crop) if spec.crop else None,
        "replay_of": str(cfg.replay) if cfg.replay else None,
    }


def _replay_source(path: Path) -> Episode:
    """The recorded episode a replay plays back (its first readable piece)."""
    path = Path(path)
    dataset = Dataset(path.parent)
    pieces = dataset.read(path, frames=False)
    if not pieces or pieces[0].start != 0 or not pieces[0].meta:
        raise DatasetError(
            f"{path} is not a readable recorded episode (a directory with meta.json and chunks)"
        )
    return pieces[0]


def existing_episodes(out: Path, game: str) -> tuple[int, int]:
    """(episodes, frames) already in ``out``; refuses a directory that holds another game."""
    if not out.exists():
        return 0, 0
    if not out.is_dir():
        raise DatasetError(f"--out {out} is a file: pass a directory")
    dataset = Dataset(out)
    episodes = frames = 0
    for episode_dir in dataset.episode_dirs:
        meta = dataset.meta(episode_dir)
        if meta.get("game") not in (None, game):
            raise DatasetError(
                f"{out} already holds episodes of {meta['game']!r}, not {game!r}: "
                "use one --out directory per game"
            )
        episodes += 1
        frames += (
            int(meta["frames"])
            if meta.get("closed")
            else sum(len(e) for e in dataset.read(episode_dir, frames=False))
        )
    return episodes, frames


def check_writable(out: Path) -> None:
    """Make ``out`` and write a probe file in it, here rather than in each worker, so that an
    unwritable folder is one clear message before any game starts (not a worker's traceback)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ValueError(f"cannot write the dataset to --out {out} ({err.strerror or err}): "
                         "pass a folder you can write to") from None


def collect(cfg: CollectConfig) -> dict[str, Any]:
    """Run a collection (in this process for one worker, else in ``cfg.workers`` processes)."""
    game = get_spec(_replay_source(cfg.replay).meta["game"] if cfg.replay else cfg.env).name
    if cfg.controller == "human" and cfg.workers != 1:
        raise ValueError("the human controller plays in one window: use --workers 1")
    if cfg.controller not in ("human", "replay") and cfg.frames is None and cfg.episodes is None:
        raise ValueError(f"--controller {cfg.controller} needs a budget: give --frames N or --episodes N")
    if cfg.controller == "replay":
        cfg = replace(cfg, episodes=1, workers=1)  # one recorded episode, played once
    if cfg.controller == "explorer":  # refuse an unsuitable game before anything starts
        env = make_game(game)
        env.close()
        ExplorerController(env.action_names)
    if cfg.controller == "tracker":
        env = make_game(game)
        env.close()
        BallTracker(env.action_names, noise=cfg.noise)
    check_writable(Path(cfg.out))
    n_existing, frames_existing = existing_episodes(Path(cfg.out), game)
    frames = cfg.frames
    if cfg.resume and frames is not None:
        frames = max(0, frames - frames_existing)
    base_seed = cfg.seed if cfg.seed is not None else secrets.randbelow(SEED_MODULUS)
    workers = max(1, cfg.workers)
    total = frames if frames is not None else cfg.episodes
    unit = "frame" if frames is not None else "episode"
    bar = tqdm(
        total=total,
        unit=unit,
        desc=f"{game} {cfg.controller}",
        disable=not cfg.progress,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
        dynamic_ncols=True,
    )

    def report(new_frames: int, new_episodes: int) -> None:
        bar.update(new_frames if unit == "frame" else new_episodes)

    start = time.monotonic()
    stop = Stop()
    previous_handlers = stop.install()
    try:
        if workers == 1:
            got_frames, got_episodes = run_session(
                cfg, frames, cfg.episodes, lambda j: n_existing + j, base_seed, stop, report
            )
        else:
            got_frames, got_episodes = run_workers(
                run_session, cfg, frames, cfg.episodes, workers, n_existing, base_seed, stop, report
            )
    finally:
        bar.close()
        restore_signals(previous_handlers)
    seconds = time.monotonic() - start
    return {
        "out": str(cfg.out),
        "game": game,
        "controller": cfg.controller,
        "frames": got_frames,
        "episodes": got_episodes,
        "seconds": round(seconds, 2),
        "frames_per_second": round(got_frames / seconds, 1) if seconds > 0 else None,
        "base_seed": base_seed,
        "interrupted": stop(),
        "existing_frames_before": frames_existing,
    }
