"""play.py: posted key events drive the loop's actions; headless runs write videos; bad input is clear."""

import os
import subprocess
import sys
from pathlib import Path

import cv2
import gymnasium as gym
import numpy as np
import pygame
import pytest

import envs  # noqa: F401  (registers WorldModel-v0)
import play
from interactive.keymaps import BREAKOUT
from interactive.keys import HeldKeys
from record.controllers import KeyboardController, load_actions, make_controller
from interactive.window import FrameWindow
from envs.world_model_env import WorldModelEnv
from episodes.reader import Dataset
from tests.conftest import make_tiny_world
from worldmodel.checkpoint import save_world

ROOT = Path(__file__).resolve().parents[1]
NOOP, FIRE, RIGHT, LEFT = range(4)  # BREAKOUT's action ids
# the test world has no reward heads on purpose (no predicted game-overs); its warning is expected
pytestmark = [pytest.mark.filterwarnings("ignore:world .* has no reward heads"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random world that says it imitates Breakout, with Breakout's actions and keymap."""
    world = make_tiny_world()
    world.reward = None  # no predicted game-overs: the loop's frame count stays simple
    world.action_names = list(BREAKOUT.actions)
    world.info = {"name": "tiny-breakout", "fps": 15, "game": "breakout", "keymap": BREAKOUT.to_dict()}
    path = tmp_path_factory.mktemp("worlds") / "tiny.safetensors"
    save_world(path, world, dtype=None)
    return str(path)


@pytest.fixture
def session(ckpt, tmp_path):
    env = WorldModelEnv(checkpoint=ckpt, steps=1, horizon=None)
    window = FrameWindow(env.observation_space.shape, title="test")
    held = HeldKeys(ignore=play.UI_KEYS)
    s = play.Session(env, window, KeyboardController(env.keymap, held), held, fps=0, seed=0,
                     record_dir=tmp_path / "rec")
    yield s
    s.close()
    window.close()


def key(kind: int, k: int) -> None:
    pygame.event.post(pygame.event.Event(kind, key=k))


def run_schedule(session, schedule: dict[int, list[tuple[int, int]]], frames: int) -> None:
    """Post ``schedule[i]`` key events before iteration i; run ``frames`` iterations."""
    for i in range(frames):
        for kind, k in schedule.get(i, []):
            key(kind, k)
        session.iterate()


def test_posted_keys_switch_actions_exactly(session):
    down, up = pygame.KEYDOWN, pygame.KEYUP
    schedule = {
        5: [(down, pygame.K_RIGHT)],
        15: [(down, pygame.K_LEFT)],   # both held: equal size, the lower id (RIGHT) wins
        20: [(up, pygame.K_RIGHT)],    # only LEFT left
        30: [(up, pygame.K_LEFT)],
        35: [(down, pygame.K_SPACE)],
        40: [(up, pygame.K_SPACE), (down, pygame.K_a)],  # WASD alternative of LEFT
        45: [(up, pygame.K_a)],
    }
    run_schedule(session, schedule, 50)
    expected = [NOOP] * 5 + [RIGHT] * 15 + [LEFT] * 10 + [NOOP] * 5 + [FIRE] * 5 + [LEFT] * 5 + [NOOP] * 5
    assert session.actions == expected
    assert session.frame_index == 50 and session.stats.summary()["frames"] == 50


def test_ui_keys_steps_pause_single_step_hud(session):
    down = pygame.KEYDOWN
    run_schedule(session, {1: [(down, pygame.K_4)], 3: [(down, pygame.K_p)], 5: [(down, pygame.K_PERIOD)],
                           7: [(down, pygame.K_h)]}, 8)
    assert session.env.steps == 4 and session.paused and not session.hud.visible
    assert len(session.actions) == 3 + 1  # 3 frames before the pause, then one single step
    key(down, pygame.K_p)
    key(down, pygame.K_r)  # reset: frame count starts again
    session.iterate()
    assert not session.paused and session.frame_index == 1 and len(session.actions) == 5
    key(down, pygame.K_ESCAPE)
    session.iterate()
    assert not session.running


def test_m_hands_control_between_agent_and_person(ckpt, tmp_path):
    env = WorldModelEnv(checkpoint=ckpt, steps=1, horizon=None)
    window = FrameWindow(env.observation_space.shape)
    held = HeldKeys(ignore=play.UI_KEYS)
    agent = make_controller(["replay", str(_write(tmp_path / "a.txt", "FIRE " * 20))], env.keymap, held)
    s = play.Session(env, window, agent, held, fps=0, switch_to=KeyboardController(env.keymap, held))
    down = pygame.KEYDOWN
    run_schedule(s, {2: [(down, pygame.K_m), (down, pygame.K_LEFT)], 5: [(down, pygame.K_m)]}, 8)
    assert s.actions == [FIRE, FIRE, LEFT, LEFT, LEFT, FIRE, FIRE, FIRE] and s.controller.name == "replay"
    s.close()
    window.close()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_record_and_video_keys(session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    down = pygame.KEYDOWN
    run_schedule(session, {0: [(down, pygame.K_c), (down, pygame.K_v), (down, pygame.K_RIGHT)],
                           10: [(down, pygame.K_c), (down, pygame.K_v)]}, 12)
    (episode,) = list(Dataset(tmp_path / "rec").episodes())
    assert len(episode) == 11 and episode.actions[0] == -1 and set(episode.actions[1:]) == {RIGHT}
    assert set(episode.controller) == {"human"} and episode.truncated[-1]
    assert episode.meta["source"] == "world:tiny-breakout"
    assert episode.meta["action_names"] == list(BREAKOUT.actions)
    (video,) = list(tmp_path.glob("dream-*.mp4"))
    assert cv2.VideoCapture(str(video)).get(cv2.CAP_PROP_FRAME_COUNT) == 10
    # the metadata remakes the dream: same env kwargs, same seed, same actions -> same frames
    meta = episode.meta
    assert meta["gym_id"] == "WorldModel-v0" and meta["episode_frame"] == 0
    env = gym.make(meta["gym_id"], **meta["make_kwargs"])
    frames = [env.reset(seed=meta["seed"])[0]] + [env.step(int(a))[0] for a in episode.actions[1:]]
    np.testing.assert_array_equal(np.stack(frames), episode.frames)


def test_tab_shows_the_real_game_side_by_side(session):
    pytest.importorskip("ale_py")
    width = session.window.screen.get_width()
    key(pygame.KEYDOWN, pygame.K_TAB)
    key(pygame.KEYDOWN, pygame.K_SPACE)
    session.iterate()
    assert session.real is not None and session.window.screen.get_width() == 2 * width
    assert session.real.frame.shape == (32, 32, 3) and session.frame_index == 1  # both restarted
    key(pygame.KEYDOWN, pygame.K_TAB)
    session.iterate()
    assert session.real is None and session.window.screen.get_width() == width


def test_headless_run_writes_an_mp4_of_n_frames(ckpt, tmp_path, capsys):
    out = tmp_path / "dream.mp4"
    code = play.main(["--headless", "--frames", "12", "--policy", "random", "--checkpoint", ckpt,
                      "--out", str(out), "--steps", "1", "--seed", "3"])
    assert code == 0
    cap = cv2.VideoCapture(str(out))
    assert cap.get(cv2.CAP_PROP_FRAME_COUNT) == 12
    ok, frame = cap.read()
    assert ok and frame.shape[0] >= 32
    printed = capsys.readouterr().out
    assert "12 frames" in printed and "FPS" in printed and "latency" in printed


def test_replay_policy_plays_the_list_then_stops(ckpt, tmp_path):
    path = tmp_path / "actions.txt"
    path.write_text("RIGHT RIGHT 3 FIRE 0")
    assert load_actions(path, list(BREAKOUT.actions)) == [RIGHT, RIGHT, LEFT, FIRE, NOOP]
    env = WorldModelEnv(checkpoint=ckpt, steps=1, horizon=None)
    window = FrameWindow(env.observation_space.shape)
    held = HeldKeys()
    s = play.Session(env, window, make_controller(["replay", str(path)], env.keymap, held), held, fps=0)
    s.run(frames=100)
    assert s.actions == [RIGHT, RIGHT, LEFT, FIRE, NOOP] and not s.running
    window.close()
    path.write_text("JUMP")
    with pytest.raises(ValueError, match="not an action"):
        load_actions(path, list(BREAKOUT.actions))


def test_bad_flags_and_missing_checkpoint_exit_nonzero_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        play.main(["--steps", "3"])
    assert exc.value.code == 2
    assert play.main(["--headless", "--checkpoint", str(tmp_path / "nope.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


@pytest.mark.parametrize("flags, message", [
    (["--threads", "-3"], "--threads must be at least 1, got -3"),
    (["--threads", "0"], "--threads must be at least 1, got 0"),
    (["--seed", "-1"], "--seed must be between 0 and 2**32 - 1, got -1"),
])
def test_bad_numbers_name_their_flag(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        play.main(["--headless", *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def _dream(ckpt, tmp_path, name, *seed):
    out = tmp_path / f"{name}.mp4"
    assert play.main(["--headless", "--frames", "6", "--policy", "random", "--checkpoint", ckpt,
                      "--out", str(out), "--steps", "1", "--threads", "1", *seed]) == 0
    cap = cv2.VideoCapture(str(out))
    return np.stack([cap.read()[1] for _ in range(6)])


def test_headless_prints_the_seed_that_repeats_the_dream(ckpt, tmp_path, capsys):
    first = _dream(ckpt, tmp_path, "a")  # no --seed: a random one, printed
    err = capsys.readouterr().err
    assert "loading" in err  # something is said while the world loads
    seed = int(err.split("play.py: seed ")[1].split()[0])
    assert f"--seed {seed} repeats this dream" in err
    again = _dream(ckpt, tmp_path, "b", "--seed", str(seed))
    assert np.array_equal(first, again)


def test_no_display_points_to_headless(ckpt):
    env = {k: v for k, v in os.environ.items()
           if k not in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER", "XDG_RUNTIME_DIR")}
    proc = subprocess.run([sys.executable, str(ROOT / "play.py"), "--checkpoint", ckpt],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no display" in proc.stderr and "--headless" in proc.stderr and "Traceback" not in proc.stderr


def test_refresh_runs_in_idle_time_only_when_it_fits(ckpt):
    """Capped with room to spare, the loop refreshes the cache after showing the frame; uncapped
    (no idle time) the refresh stays pending and rides along the next frame's first call."""
    env = WorldModelEnv(checkpoint=ckpt, steps=1, horizon=None)
    window = FrameWindow(env.observation_space.shape)
    held = HeldKeys(ignore=play.UI_KEYS)
    engine = env.runtime.engine
    for fps, pending_after in ((0, True), (2, False)):  # 2 FPS: a 500 ms budget per frame
        s = play.Session(env, window, make_controller(["random"], env.keymap, held, 0), held, fps=fps)
        s.iterate()
        assert (engine._pending is not None) == pending_after
    window.close()
    assert play.main(["--headless", "--frames", "3", "--policy", "random", "--checkpoint", ckpt,
                      "--separate-refresh"]) == 0


def test_the_hud_sits_below_the_frame_and_covers_none_of_it(ckpt, tmp_path):
    env = WorldModelEnv(checkpoint=ckpt, steps=1, horizon=None)
    from interactive.hud import Hud
    window = FrameWindow(env.observation_space.shape, title="test", strip=Hud().height(play.HUD_LINES) + 8)
    held = HeldKeys(ignore=play.UI_KEYS)
    s = play.Session(env, window, KeyboardController(env.keymap, held), held, fps=0, seed=0,
                     record_dir=tmp_path / "rec")
    s.iterate()
    pw, ph = window.panel_size
    shown = pygame.surfarray.array3d(window.screen).swapaxes(0, 1)  # (y, x, 3)
    assert shown.shape[0] > ph  # a strip below the frame
    # the frame area is exactly the zoomed frame: no text box over the game's score or lives
    zoomed = np.repeat(np.repeat(s.frame, window.scale, 0), window.scale, 1)
    assert np.array_equal(shown[:ph, :pw], zoomed)
    assert shown[ph:].max() > 0  # the HUD's text is in the strip
    s.close()
    window.close()
