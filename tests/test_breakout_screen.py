"""Breakout's screen reader and the ball-tracking controller, on real ALE frames and hand-made ones."""

import numpy as np
import pytest

from envs.breakout import BALL_RGB, BRICK_GRID, NATIVE_SHAPE, BreakoutScreen, ball_native, paddle_native
from episodes.frames import resize_frames
from envs.registry import make_game
from record.controllers import RandomController
from record.tracker import BallTracker

NAMES = ["NOOP", "FIRE", "RIGHT", "LEFT"]


def play(controller, steps: int, seed: int = 0) -> tuple[np.ndarray, float]:
    """Native frames of one real game under ``controller`` and the reward it collected."""
    env = make_game("breakout")
    frame, _ = env.reset(seed=seed)
    controller.reset(frame, seed=seed)
    frames, total = [frame], 0.0
    for _ in range(steps):
        frame, reward, terminated, truncated, _ = env.step(controller.act(frame))
        frames.append(frame)
        total += reward
        if terminated or truncated:
            frame, _ = env.reset()
            controller.reset(frame)
    env.close()
    return np.stack(frames), total


@pytest.fixture(scope="module")
def real() -> np.ndarray:
    frames, _ = play(BallTracker(NAMES, noise=0.1, seed=0), 400)
    return frames


def test_native_readers_find_the_ball_and_paddle(real: np.ndarray) -> None:
    balls = [ball_native(f) for f in real]
    assert 0.3 < np.mean([b is not None for b in balls]) < 1.0  # served, in flight, and lost sometimes
    assert all(paddle_native(f) is not None for f in real[:50])
    blank = real[0].copy()
    blank[93:189] = 0
    assert ball_native(blank) is None


def test_small_frames_read_the_ball_where_the_native_frame_has_it(real: np.ndarray) -> None:
    small = resize_frames(real, (64, 64))
    screen = BreakoutScreen((64, 64))
    hits = misses = 0
    for native, frame in zip(real, small):
        truth, reading = ball_native(native), screen.read_ball(frame)
        if truth is None or screen.field_edge(truth[0] * 64 / NATIVE_SHAPE[0], truth[1] * 64 / NATIVE_SHAPE[1], 2):
            continue
        if reading.ball is None:
            misses += 1
            continue
        hits += 1
        expected = (truth[0] * 64 / NATIVE_SHAPE[0], truth[1] * 64 / NATIVE_SHAPE[1])
        assert abs(reading.ball[0] - expected[0]) < 1.5 and abs(reading.ball[1] - expected[1]) < 1.5
    assert hits > 50 and misses <= 0.05 * hits


@pytest.mark.parametrize(
    "draw, blobs, is_ball",
    [
        (lambda f: None, 0, False),                                         # erased ball
        (lambda f: f[40:42, 30].__setitem__(..., BALL_RGB), 1, True),       # a ball (1x2 px at 64x64)
        (lambda f: (f[40:42, 30].__setitem__(..., BALL_RGB), f[44:46, 30].__setitem__(..., BALL_RGB)), 2, False),
        (lambda f: f[35:50, 28:33].__setitem__(..., BALL_RGB), 1, False),   # a smear
        (lambda f: f[40:42, 30].__setitem__(..., (20, 8, 8)), 0, False),    # decoder noise stays dark
    ],
    ids=["erased", "ball", "double", "smear", "faint"],
)
def test_hand_made_fields(draw, blobs: int, is_ball: bool) -> None:
    screen = BreakoutScreen((64, 64))
    frame = np.zeros((64, 64, 3), np.uint8)  # an empty field
    draw(frame)
    reading = screen.read_ball(frame)
    assert reading.blobs == blobs and (reading.ball is not None) == is_ball
    if is_ball:
        assert abs(reading.ball[0] - 40.5) < 0.01 and abs(reading.ball[1] - 30) < 0.01


def test_bricks_read_a_broken_brick(real: np.ndarray) -> None:
    small = resize_frames(real[:1], (64, 64))[0]
    screen = BreakoutScreen((64, 64))
    full = screen.bricks(small)
    assert full.shape == BRICK_GRID and full.all()
    native = real[0].copy()
    native[57 + 12 : 57 + 18, 8 + 5 * 8 : 8 + 6 * 8] = 0  # break row 2, column 5
    broken = screen.bricks(resize_frames(native[None], (64, 64))[0])
    assert (~broken).sum() == 1 and not broken[2, 5]
    with pytest.raises(ValueError, match="expected"):
        screen.bricks(real[0])


def test_tracker_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="lack"):
        BallTracker(["NOOP", "UP", "DOWN"])
    with pytest.raises(ValueError, match="noise"):
        BallTracker(NAMES, noise=1.5)


def test_tracker_keeps_the_ball_in_play_and_breaks_bricks() -> None:
    steps = 600
    tracked, tracked_reward = play(BallTracker(NAMES, noise=0.15, seed=1), steps, seed=1)
    rand, rand_reward = play(RandomController(4, repeat=(1, 4), seed=1), steps, seed=1)
    in_flight = lambda frames: np.mean([ball_native(f) is not None for f in frames])  # noqa: E731
    assert in_flight(tracked) > in_flight(rand) + 0.15
    assert tracked_reward > rand_reward and tracked_reward >= 5
    # the noise is real: every action is taken, not only the tracking ones
    ctrl = BallTracker(NAMES, noise=0.5, seed=0)
    ctrl.reset(tracked[0], seed=0)
    assert set(ctrl.act(f) for f in tracked[:200]) == set(range(4))
