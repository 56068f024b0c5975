"""The play check catches what it claims: a one-colour screen, a blur, a world that ignores or
forgets its turns; and passes a world that is the game."""

from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from train.eval.play_check import (BURSTS, applies, colour_distance, compare, play_check, player_plan,
                                   summarise, turn_back_plans)

NAMES = ["NOOP", "FORWARD", "BACKWARD", "TURN_LEFT", "TURN_RIGHT", "STRAFE_LEFT", "STRAFE_RIGHT"]
STEP = 6  # panorama columns per turn frame


def panorama(seed: int = 0, width: int = 640) -> np.ndarray:
    """A wide textured 'room' (64, width, 3): blocks of grey, brown and blue with fine detail."""
    rng = np.random.default_rng(seed)
    pal = np.array([[110, 110, 110], [120, 80, 40], [30, 40, 110], [160, 160, 150]], np.float32)
    blocks = pal[rng.integers(0, len(pal), (8, width // 16))]
    img = cv2.resize(blocks, (width, 64), interpolation=cv2.INTER_NEAREST)
    img += rng.normal(0, 14, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def view(pano: np.ndarray, heading: int) -> np.ndarray:
    return np.roll(pano, -heading * STEP, axis=1)[:, :64]


class PanoramaWorld:
    """A fake rollout: the view is a window on a panorama that turns with the keys (``mode``:
    "game" turns it, "ignore" never turns, "forget" shows red once it has turned away,
    "red" melts into red after ``melt`` frames, "blur" is the game blurred)."""

    def __init__(self, mode: str = "game", melt: int = 20) -> None:
        self.mode, self.melt, self.pano = mode, melt, panorama()

    def run(self, context, context_actions, actions, seed):
        left, right = NAMES.index("TURN_LEFT"), NAMES.index("TURN_RIGHT")
        out = np.zeros((*actions.shape, 64, 64, 3), np.uint8)
        for b, acts in enumerate(actions):
            heading, turned = 0, False
            for t, a in enumerate(acts):
                heading += (int(a == left) - int(a == right)) if self.mode != "ignore" else 0
                turned |= heading != 0
                frame = view(self.pano, heading)
                if self.mode == "forget" and turned:
                    frame = np.full_like(frame, (200, 20, 20))
                if self.mode == "red" and t >= self.melt:
                    frame = np.full_like(frame, (190, 25, 25))
                if self.mode == "blur":
                    frame = cv2.GaussianBlur(frame, (0, 0), 2.5)
                out[b, t] = frame
        return out


def real_pieces(n: int = 2, frames: int = 200):
    pano = panorama()
    rng = np.random.default_rng(1)
    return [SimpleNamespace(frames=np.stack([view(pano, int(h)) for h in rng.integers(0, 100, frames)]))
            for _ in range(n)]


def contexts(b: int = 2):
    start = view(panorama(), 0)
    return np.stack([np.stack([start] * 4)] * b), np.zeros((b, 4), np.int64)


WORLD = SimpleNamespace(action_names=NAMES)


def test_player_plan_is_seeded_bursts_of_the_games_actions():
    a, b = player_plan(NAMES, 500, seed=3), player_plan(NAMES, 500, seed=3)
    assert (a == b).all() and len(a) == 500 and (a != player_plan(NAMES, 500, seed=4)).any()
    assert set(a.tolist()) <= set(range(len(NAMES)))
    runs = np.split(a, np.flatnonzero(np.diff(a)) + 1)[:-1]   # the last burst may be cut short
    assert np.mean([len(r) for r in runs]) >= 4                 # bursts, not random keys
    assert (a == NAMES.index("FORWARD")).mean() > 0.2 and (a == NAMES.index("TURN_LEFT")).any()
    assert "FORWARD_TURN_LEFT" in BURSTS and not applies(["LEFT", "RIGHT", "FIRE"])


def test_turn_back_plans_come_back_and_go_away():
    back, away = turn_back_plans(NAMES, 4)
    assert back.tolist() == [3] * 4 + [4] * 4 and away.tolist() == [3] * 8


def test_a_red_screen_fails_uniform_and_colour_and_is_far_in_colour():
    real = summarise([p.frames for p in real_pieces()])
    red = summarise([np.full((100, 64, 64, 3), (190, 25, 25), np.uint8)])
    assert red["near_uniform_share"] == 1.0 and red["one_colour_share"] == 1.0
    assert real["near_uniform_share"] == 0.0 and real["one_colour_share"] < 0.6
    verdict = compare(red, real, margin_db=5.0)
    assert not verdict["passes"]["near_uniform"] and not verdict["passes"]["one_colour"]
    assert not verdict["passes"]["sharpness"] and verdict["colour_distance"] > 0.9


def test_the_real_frames_pass_against_themselves():
    frames = [p.frames for p in real_pieces()]
    real = summarise(frames)
    verdict = compare(summarise(frames), real, margin_db=5.0)
    assert all(verdict["passes"].values()) and verdict["colour_distance"] == 0.0


def test_a_blur_keeps_its_colours_but_fails_sharpness():
    frames = [p.frames for p in real_pieces()]
    blurred = [np.stack([cv2.GaussianBlur(f, (0, 0), 2.5) for f in s]) for s in frames]
    verdict = compare(summarise(blurred), summarise(frames), margin_db=5.0)
    assert verdict["sharpness_ratio"] < 0.5 and not verdict["passes"]["sharpness"]
    # still no one-colour screen, and nearer the real colours than a red screen (> 0.9, above);
    # mixing neighbouring walls' colours at their edges is a colour change too
    assert verdict["passes"]["near_uniform"] and verdict["passes"]["one_colour"]
    assert verdict["colour_distance"] < 0.6


def test_colour_distance_is_total_variation():
    a, b = np.array([0.5, 0.5, 0.0]), np.array([0.0, 0.5, 0.5])
    assert colour_distance(a, b) == pytest.approx(0.5) and colour_distance(a, a) == 0.0


@pytest.mark.parametrize("mode, passes", [("game", True), ("ignore", False), ("forget", False)])
def test_turn_back_margin_needs_a_world_that_turns_and_remembers(mode, passes):
    out = play_check(WORLD, PanoramaWorld(mode), real_pieces(), contexts(), frames=200, seed=0)
    assert out["passes"]["turn_back"] is passes, out["turn_back_margin_db"]
    if mode == "game":
        assert out["turn_back_margin_db"] > 10  # exact return (60 dB cap) vs another view


def test_a_world_that_melts_into_red_fails_the_play_check_over_a_long_rollout():
    good = play_check(WORLD, PanoramaWorld("game"), real_pieces(), contexts(), frames=400, seed=0)
    red = play_check(WORLD, PanoramaWorld("red", melt=20), real_pieces(), contexts(), frames=400, seed=0)
    assert all(good["passes"].values()), good["passes"]
    assert not red["passes"]["near_uniform"] and not red["passes"]["one_colour"]
    assert red["late_colour_distance"] > 0.9 and len(red["per_context"]) == 2
    assert red["frames"].shape == (2, 400, 64, 64, 3)


def test_play_check_skips_worlds_without_turns():
    breakout = SimpleNamespace(action_names=["NOOP", "FIRE", "RIGHT", "LEFT"])
    assert play_check(breakout, PanoramaWorld(), real_pieces(), contexts(), 100, 0) is None


def test_one_colour_flag_still_fails_red_when_real_views_are_mostly_one_wall():
    """Real first-person views are often two thirds one wall: the mean dominant-colour share of
    the real frames is then ~0.65, and a bar of 2x that would pass a red screen. The flag counts
    frames one colour covers (>= 80%) instead, which the real frames never are and red always is."""
    rng = np.random.default_rng(0)
    real = np.empty((50, 64, 64, 3), np.uint8)
    real[:] = (120, 80, 40)                                     # a brown wall ...
    real[:, :, 42:] = rng.integers(0, 256, (50, 64, 22, 3))     # ... beside a busy third of the view
    stats = summarise([real])
    assert 0.6 < stats["dominant_colour_share"] < 0.75 and stats["one_colour_share"] == 0.0
    red = summarise([np.full((50, 64, 64, 3), (190, 25, 25), np.uint8)])
    assert not compare(red, stats, margin_db=5.0)["passes"]["one_colour"]
    assert red["dominant_colour_share"] <= 2 * stats["dominant_colour_share"]  # the old reading passed it
