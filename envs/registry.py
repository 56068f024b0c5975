"""The registry of source games: one GameSpec per game, and ``make_game`` to build it.

A spec says everything the rest of the project needs to know about a real game: how to make it
(Gymnasium id, kwargs, wrappers), how a person plays it (keymap), how fast it runs (fps), where its
frames come from, and how frames are brought to the model's resolution.

``get_spec`` accepts a spec name (``breakout``) or a Gymnasium id. An id that belongs to a shipped
spec returns that spec (``ALE/Breakout-v5`` -> ``breakout``, with its settings); any other
registered id with Discrete actions and an image observation or ``rgb_array`` render works with a
keymap derived from its action names.

Importing this module is cheap: game packages (ale_py, vizdoom, minigrid) are imported only
when a game that needs them is looked up or made.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import gymnasium as gym
import numpy as np

from envs.doom import BUTTONS as DOOM_BUTTONS
from envs.doom import GAME_VARIABLES as DOOM_GAME_VARIABLES
from envs.game_env import GameEnv
from interactive.keymaps import BREAKOUT, DOOM_NAVIGATION, MINIGRID, PONG, Keymap, default_keymap
from episodes.frames import Crop, Size, resize_frames

MODEL_SIZE: Size = (64, 64)  # default model resolution, (height, width)

# Gymnasium id prefix -> module whose import registers those ids.
_PROVIDERS = (
    ("ALE/", "ale_py"),
    ("Vizdoom", "vizdoom.gymnasium_wrapper"),
    ("MiniGrid-", "minigrid"),
    ("BabyAI-", "minigrid"),
)
_INSTALL_HINT = {"ale_py": "ale-py", "vizdoom.gymnasium_wrapper": "vizdoom", "minigrid": "minigrid"}


class UnknownGameError(ValueError):
    """A game name or id that is neither a shipped spec nor a registered Gymnasium id."""


class UnsupportedGameError(ValueError):
    """A Gymnasium env that cannot be a source game (no Discrete actions, no RGB frames)."""


@dataclass(frozen=True)
class GameSpec:
    """How to make, play and preprocess one source game.

    name:         short name used on the command line and in dataset metadata.
    gym_id:       Gymnasium id passed to ``gym.make``.
    make_kwargs:  extra ``gym.make`` kwargs (JSON-able: they are stored in episode metadata).
    keymap:       named actions and their keys; None derives one from the env's action names.
    fps:          frames per second of real play (one env step = one frame); None reads it from
                  the env (ALE: 60 / frameskip, ViZDoom: 35 / frame_skip, else render_fps).
    frame_source: "obs", "obs:KEY", "render", or "auto" (decided from the observation space).
    wrappers:     ("module:Class", kwargs) applied in order after ``gym.make``.
    imports:      modules to import before ``gym.make`` (they register the id).
    model_size:   (height, width) the model sees.
    crop:         pixels cut from (top, bottom, left, right) before resizing, or None.
    """

    name: str
    gym_id: str
    make_kwargs: Mapping[str, Any] = field(default_factory=dict)
    keymap: Keymap | None = None
    fps: float | None = None
    frame_source: str = "auto"
    wrappers: tuple[tuple[str, Mapping[str, Any]], ...] = ()
    imports: tuple[str, ...] = ()
    model_size: Size = MODEL_SIZE
    crop: Crop | None = None
    description: str = ""

    def preprocess(self, frames: np.ndarray, size: Size | None = None) -> np.ndarray:
        """Native frames (..., H, W, 3) uint8 -> model frames (..., h, w, 3) uint8 (INTER_AREA)."""
        return resize_frames(frames, size or self.model_size, self.crop)


# ALE ids get repeat_action_probability=0: with v5's default sticky actions (0.25) the recorded
# action is not always the one executed, which would mislabel the data and break replay.
_ALE_KWARGS = {"repeat_action_probability": 0.0}

SPECS: dict[str, GameSpec] = {
    spec.name: spec
    for spec in (
        GameSpec(
            name="breakout",
            gym_id="ALE/Breakout-v5",
            make_kwargs=_ALE_KWARGS,
            keymap=BREAKOUT,
            fps=15.0,  # 60 Hz Atari, frameskip 4
            frame_source="obs",
            imports=("ale_py",),
            description="Atari Breakout, 210x160, the game DIAMOND's world model is measured on",
        ),
        GameSpec(
            name="pong",
            gym_id="ALE/Pong-v5",
            make_kwargs=_ALE_KWARGS,
            keymap=PONG,
            fps=15.0,
            frame_source="obs",
            imports=("ale_py",),
            description="Atari Pong, 210x160",
        ),
        GameSpec(
            name="doom",
            gym_id="VizdoomMyWayHome-MultiBinary-v1",
            make_kwargs={
                "frame_skip": 2,  # 35 Hz tics / 2 = 17.5 frames per second
                "available_buttons": list(DOOM_BUTTONS),
                "available_game_variables": list(DOOM_GAME_VARIABLES),
                "episode_timeout": 4200,  # tics = 2 minutes, 2100 frames (the scenario's is 1 minute)
            },
            keymap=DOOM_NAVIGATION,
            fps=17.5,
            frame_source="obs:screen",
            wrappers=(("envs.doom:DoomActions", {}),),
            imports=("vizdoom.gymnasium_wrapper",),
            description="ViZDoom MyWayHome: first-person walking through a maze of differently "
            "textured rooms, 320x240, no monsters, HUD off",
        ),
        GameSpec(
            name="minigrid",
            gym_id="MiniGrid-DoorKey-8x8-v0",
            keymap=MINIGRID,
            fps=10.0,
            frame_source="obs",
            wrappers=(
                ("minigrid.wrappers:RGBImgObsWrapper", {"tile_size": 8}),  # 8x8 grid x 8 px = 64x64
                ("minigrid.wrappers:ImgObsWrapper", {}),
            ),
            imports=("minigrid",),
            description="MiniGrid DoorKey 8x8, fully observed at exactly 64x64: for fast tests",
        ),
    )
}


def get_spec(name_or_gym_id: str) -> GameSpec:
    """The spec for a shipped game name or a Gymnasium id (see the module docstring)."""
    if name_or_gym_id in SPECS:
        return SPECS[name_or_gym_id]
    for spec in SPECS.values():
        if spec.gym_id == name_or_gym_id:
            return spec
    module = _import_provider(name_or_gym_id)
    if name_or_gym_id not in gym.registry:
        close = difflib.get_close_matches(name_or_gym_id, [*SPECS, *gym.registry], n=3, cutoff=0.6)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise UnknownGameError(
            f"unknown game {name_or_gym_id!r}.{hint} Known names: {', '.join(SPECS)}; "
            "or pass any registered Gymnasium id with Discrete actions and RGB frames "
            "(e.g. ALE/Pong-v5, VizdoomMyWayHome-v1, MiniGrid-Empty-8x8-v0)."
        )
    kwargs = dict(_ALE_KWARGS) if name_or_gym_id.startswith("ALE/") else {}
    return GameSpec(
        name=name_or_gym_id,
        gym_id=name_or_gym_id,
        make_kwargs=kwargs,
        imports=(module,) if module else (),
        description=f"Gymnasium env {name_or_gym_id} (generic: keymap from action names)",
    )


def make_game(
    spec: GameSpec | str,
    render_mode: str | None = None,
    seed: int | None = None,
    **make_kwargs: Any,
) -> GameEnv:
    """Build a source game as a :class:`GameEnv` (frames out, named discrete actions in).

    spec:        a GameSpec, a spec name or a Gymnasium id.
    render_mode: passed to ``gym.make``; forced to ``"rgb_array"`` for render-sourced frames.
    seed:        seeds the first ``reset()`` (unless it is given its own) and the action space.
    make_kwargs: override the spec's ``make_kwargs``.
    """
    if isinstance(spec, str):
        spec = get_spec(spec)
    for module in spec.imports:
        _import_module(module)
    kwargs = {**spec.make_kwargs, **make_kwargs}
    env = gym.make(spec.gym_id, render_mode=_render_mode_for(spec, render_mode), **kwargs)
    for path, wrapper_kwargs in spec.wrappers:
        env = _load(path)(env, **wrapper_kwargs)
    if not isinstance(env.action_space, gym.spaces.Discrete):
        env.close()
        raise UnsupportedGameError(
            f"{spec.gym_id} has action space {env.action_space}; a source game needs Discrete "
            "actions. Add a GameSpec whose wrapper maps named actions to it (see envs/doom.py)."
        )
    frame_source = spec.frame_source if spec.frame_source != "auto" else _frame_source(env)
    names = _action_names(env)
    keymap = spec.keymap or default_keymap(names)
    if list(keymap.actions) != names:
        env.close()
        raise ValueError(f"{spec.name}: keymap actions {list(keymap.actions)} != env actions {names}")
    spec = replace(
        spec, make_kwargs=kwargs, fps=spec.fps or _native_fps(env), frame_source=frame_source, keymap=keymap
    )
    return GameEnv(env, spec, keymap, names, frame_source, seed=seed)


def _render_mode_for(spec: GameSpec, render_mode: str | None) -> str | None:
    # "auto" may fall back to render(), which only works if the env was made in rgb_array mode.
    if spec.frame_source in ("render", "auto") and render_mode is None:
        return "rgb_array"
    return render_mode


def _frame_source(env: gym.Env) -> str:
    """Where the frames of a generic env come from: the observation if it is an image, else render."""
    space = env.observation_space
    if _is_frame_space(space):
        return "obs"
    if isinstance(space, gym.spaces.Dict):
        for key in ("screen", "image", "pixels", "rgb"):
            if key in space.spaces and _is_frame_space(space[key]):
                return f"obs:{key}"
    if env.render_mode != "rgb_array":
        raise UnsupportedGameError(
            f"{env.spec.id if env.spec else env}: observations are not RGB frames and the env "
            "was not made with render_mode='rgb_array'; a source game needs one or the other."
        )
    return "render"


MIN_FRAME_SIDE = (
    24  # pixels; smaller (H, W, 3) observations are symbolic grids (MiniGrid's 7x7x3), not images
)


def _is_frame_space(space: gym.Space) -> bool:
    shape = getattr(space, "shape", None)
    return (
        isinstance(space, gym.spaces.Box)
        and space.dtype == np.uint8
        and shape is not None
        and len(shape) == 3
        and shape[-1] == 3
        and min(shape[:2]) >= MIN_FRAME_SIDE
    )


def _action_names(env: gym.Env) -> list[str]:
    """Names of a Discrete action space, from whatever the game exposes."""
    n = int(env.action_space.n)
    names = getattr(env, "action_names", None)  # our wrappers (DoomActions)
    unwrapped = env.unwrapped
    if names is None and hasattr(unwrapped, "get_action_meanings"):  # ALE
        names = list(unwrapped.get_action_meanings())
    if names is None and hasattr(unwrapped, "actions") and hasattr(unwrapped.actions, "__members__"):
        names = list(unwrapped.actions.__members__)  # MiniGrid's Actions IntEnum
    if names is None and hasattr(unwrapped, "button_map") and hasattr(unwrapped, "game"):  # ViZDoom
        buttons = [b.name for b in unwrapped.game.get_available_buttons()]
        names = ["+".join(b for b, on in zip(buttons, row) if on) or "NOOP" for row in unwrapped.button_map]
    if names is None or len(names) != n:
        names = [f"ACTION_{i}" for i in range(n)]
    return [str(name) for name in names]


def _native_fps(env: gym.Env) -> float:
    unwrapped = env.unwrapped
    if hasattr(unwrapped, "ale"):  # ALE runs at 60 Hz and steps `frameskip` frames
        skip = getattr(unwrapped, "_frameskip", 1)
        return 60.0 / skip if isinstance(skip, int) and skip > 0 else 15.0
    if hasattr(unwrapped, "game") and hasattr(unwrapped, "frame_skip"):  # ViZDoom: 35 tics/s
        return 35.0 / max(1, int(unwrapped.frame_skip))
    return float(env.metadata.get("render_fps") or 30.0)


def _import_provider(gym_id: str) -> str | None:
    """Import the package that registers ``gym_id``, if its prefix names one."""
    for prefix, module in _PROVIDERS:
        if gym_id.startswith(prefix):
            _import_module(module)
            return module
    return None


def _import_module(module: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError as err:
        package = _INSTALL_HINT.get(module, module.split(".")[0])
        raise UnknownGameError(
            f"this game needs the package {package!r}: pip install {package} ({err})"
        ) from err


def _load(path: str) -> Any:
    """``"package.module:attr"`` -> the attribute (used for spec wrappers)."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)
