"""The game-behaviour check: real Breakout passes it, and each hand-broken copy fails the bar it targets."""

import numpy as np
import pytest

from envs.breakout import BreakoutScreen
from episodes.frames import resize_frames
from envs.registry import make_game
from record.controllers import RandomController
from record.tracker import BallTracker
from train.eval.game import breakout_events, closed_loop, compare, make_controller, summarise

NAMES = ["NOOP", "FIRE", "RIGHT", "LEFT"]
SCREEN = BreakoutScreen((64, 64))


@pytest.fixture(scope="module")
def real() -> np.ndarray:
    """Two 500-frame stretches of real play by the tracker, at 64x64."""
    out = []
    for seed in (0, 1):
        env = make_game("breakout")
        frame, _ = env.reset(seed=seed)
        ctrl = BallTracker(NAMES, noise=0.1, seed=seed)
        ctrl.reset(frame, seed=seed)
        frames = [frame]
        for _ in range(499):
            frame, _, terminated, truncated, _ = env.step(ctrl.act(frame))
            if terminated or truncated:
                frame, _ = env.reset()
            frames.append(frame)
        env.close()
        out.append(resize_frames(np.stack(frames), (64, 64)))
    return np.stack(out)


def rates(seqs: np.ndarray) -> dict:
    return summarise([breakout_events(s) for s in seqs])


def field(frames: np.ndarray) -> np.ndarray:
    return frames[..., SCREEN.field_rows, SCREEN.play_cols, :]


def test_real_play_passes_against_itself(real: np.ndarray) -> None:
    r = rates(real)
    assert r["ball_share"] > 0.5 and r["flights"] >= 4 and r["brick_breaks_per_1000"] > 5
    assert r["vanish_per_flight"] == 0 and r["broken_ball_share"] == 0 and r["bricks_restored_per_1000"] == 0
    assert all(compare(r, r)["passes"].values())


def test_an_erased_ball_fails_ball_share(real: np.ndarray) -> None:
    fake = real.copy()
    field(fake)[...] = 0
    c = compare(rates(fake), rates(real))
    assert c["ball_share_ratio"] == 0 and not c["passes"]["ball_share"] and c["passes"]["brick_breaks"]


def test_a_double_ball_is_not_a_ball(real: np.ndarray) -> None:
    fake = real.copy()
    f = field(fake)
    f[..., 4:, :, :] = np.maximum(f[..., 4:, :, :], f[..., :-4, :, :].copy())  # a second dot 4 rows below
    w = rates(fake)
    assert w["broken_ball_share"] > 0.4 and not compare(w, rates(real))["passes"]["ball_share"]


def test_a_ball_that_vanishes_mid_flight_fails_continuity(real: np.ndarray) -> None:
    fake = real.copy()
    for seq in fake:
        seen = [i for i, f in enumerate(seq) if SCREEN.read_ball(f).ball is not None]
        for i in seen:
            row, col = SCREEN.read_ball(seq[i]).ball
            if not SCREEN.field_edge(row, col, 8):  # erase the ball once it is well inside the field
                field(seq[i:i + 1])[...] = 0
    w = rates(fake)
    assert w["vanish_per_flight"] > 0.5 and not compare(w, rates(real))["passes"]["vanish"]


def test_bricks_that_never_break_or_come_back(real: np.ndarray) -> None:
    rows = slice(0, SCREEN.field_rows.start)
    frozen = real.copy()
    frozen[:, :, rows] = real[:, :1, rows]
    c = compare(rates(frozen), rates(real))
    assert c["brick_rate_ratio"] == 0 and not c["passes"]["brick_breaks"] and c["passes"]["ball_share"]
    backwards = rates(real[:, ::-1])  # every break, played in reverse, is a brick coming back
    assert backwards["brick_breaks_per_1000"] == 0 and backwards["bricks_restored_per_1000"] > 5


def test_flicker_is_not_a_break(real: np.ndarray) -> None:
    rows = slice(0, SCREEN.field_rows.start)
    flicker = real.copy()
    flicker[:, 1::3, rows] = 0  # the wall drops out one frame in three
    assert rates(flicker)["brick_breaks_per_1000"] <= rates(real)["brick_breaks_per_1000"]


def test_a_wall_that_blinks_back_breaks_no_brick(real: np.ndarray) -> None:
    """Bricks that vanish long enough to count as broken and then come back (what a world that
    forgets its wall draws) clear nothing: the bar is on bricks that stay broken."""
    rows = slice(0, SCREEN.field_rows.start)
    blink = real.copy()
    blink[:, :, rows] = real[:, :1, rows]  # the first frame's wall, which never loses a brick ...
    for start in range(0, real.shape[1], 12):
        blink[:, start + 6:start + 12, rows] = 0  # ... gone for 6 frames in every 12, then back
    w, r = rates(blink), rates(real)
    assert w["brick_breaks_per_1000"] > 2 * r["brick_breaks_per_1000"]  # counted as breaks ...
    assert w["bricks_kept_broken_per_1000"] < 0.2 * r["bricks_kept_broken_per_1000"]  # ... but none stay broken
    assert not compare(w, r)["passes"]["brick_breaks"]


def test_the_tracker_reads_small_frames_as_it_reads_native_ones(real: np.ndarray) -> None:
    meta = {"controller": "tracker", "controller_config": {"noise": 0.0}, "action_names": NAMES}
    ctrl = make_controller(meta, 4, (64, 64), seed=0)
    assert isinstance(ctrl, BallTracker) and ctrl.screen is not None
    ctrl.reset(real[0, 0])
    acts = np.array([ctrl.act(f) for f in real[0]])
    assert {2, 3} <= set(acts)  # it steers both ways after the ball it reads
    assert isinstance(make_controller({"controller": "random"}, 4, (64, 64), 0), RandomController)


class FakeEngine:
    """Shows frame k of a fixed sequence after k steps and remembers the actions it was given."""

    def __init__(self, seqs: np.ndarray) -> None:
        self.seqs, self.t, self.actions = seqs, 0, []
        self.latents = None

    def reset(self, context, context_actions, seed) -> None:
        self.t = 0

    def flush(self) -> None:
        pass

    def step(self, actions: np.ndarray) -> np.ndarray:
        import torch

        self.actions.append(actions.copy())
        self.t += 1
        self.latents = torch.zeros(len(actions), 2)
        return self.seqs[:, self.t]


def test_closed_loop_feeds_each_controller_its_own_world(real: np.ndarray) -> None:
    eng = FakeEngine(real)

    class Ro:
        def engine(self, batch):
            return eng

    seen = []

    class Spy(RandomController):
        def act(self, frame):
            seen.append(frame)
            return len(seen) % 4

    ctrls = [Spy(4, seed=0), Spy(4, seed=1)]
    frames, acts, _ = closed_loop(Ro(), real[:, :3], np.zeros((2, 3), np.int64), ctrls, 5, seed=0)
    assert frames.shape == (2, 5, 64, 64, 3) and np.array_equal(frames, real[:, 1:6])
    # the first choice reads the last context frame, every later one the frame the world just showed
    assert np.array_equal(seen[0], real[0, 2]) and np.array_equal(seen[2], real[0, 1])
    assert np.array_equal(seen[3], real[1, 1]) and acts.shape == (2, 5)
    assert np.array_equal(np.stack(eng.actions), acts.T) and np.array_equal(acts[0], [1, 3, 1, 3, 1])


def test_evaluate_reports_the_game_check(tmp_path) -> None:
    import json

    from conftest import make_tiny_world
    from record.collect import CollectConfig, collect
    from train.eval.run import main as evaluate_main
    from worldmodel.checkpoint import save_world

    collect(CollectConfig(env="breakout", controller="tracker", out=tmp_path / "data", frames=300, seed=0,
                          progress=False))
    world = make_tiny_world(num_actions=4, image_size=64, context=12)  # one reset clip, long enough
    world.action_names = NAMES
    save_world(tmp_path / "w.safetensors", world)
    out = tmp_path / "out"
    assert evaluate_main([f"checkpoint={tmp_path / 'w.safetensors'}", f"data={tmp_path / 'data'}", f"out={out}",
                          "horizons=1", "rollout=8", "probe_steps=5", "starts=2", "videos=1",
                          "game_rollout=24", "game_contexts=2"]) == 0
    game = json.loads((out / "metrics.json").read_text())["game"]
    assert game["controller"] == "tracker" and game["real"]["ball_share"] > 0.4
    assert game["world"]["sequences"] == 3 and game["world"]["frames"] == 72  # 2 held-out contexts + 1 reset clip
    assert not game["passes"]["ball_share"]  # an untrained world shows no ball
    assert game["tokenizer"]["ball_share"] < 0.1  # ... and its random tokenizer draws none either
    assert "### Game behaviour" in (out / "table.md").read_text() and (out / "samples" / "game_0.mp4").is_file()


def test_tokenizer_ceiling_reads_what_the_tokenizer_draws(real: np.ndarray) -> None:
    import torch

    from train.eval.game import through_tokenizer

    class Identity(torch.nn.Module):  # a perfect tokenizer, and one that erases the field
        def __init__(self, erase: bool) -> None:
            super().__init__()
            self.p, self.erase = torch.nn.Parameter(torch.zeros(1)), erase

        def encode(self, x):
            return x

        def decode(self, z):
            z = z.clone()
            if self.erase:
                z[..., SCREEN.field_rows, SCREEN.play_cols, :] = 0
            return z

    assert rates(through_tokenizer(Identity(False), real[0], batch=64)[None]) == rates(real[:1])
    assert rates(through_tokenizer(Identity(True), real[0])[None])["ball_share"] == 0
