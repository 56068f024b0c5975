"""The still maker (`python -m envs.strip`): plans parse, rows replay the env, bad input exits 2."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from envs.strip import main, parse_plan, render_strip
from envs.world_model_env import WorldModelEnv

NAMES = ["NOOP", "FIRE", "RIGHT", "LEFT"]


def test_parse_plan_expands_counts_case_insensitively() -> None:
    assert parse_plan("noop*2, Right*3,left", NAMES) == [0, 0, 2, 2, 2, 3]


@pytest.mark.parametrize("plan, says", [("jump*2", "NOOP, FIRE, RIGHT, LEFT"), ("fire*0", "N >= 1"),
                                        ("fire*x", "N >= 1"), (" , ", "empty plan")])
def test_parse_plan_names_the_problem(plan: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_plan(plan, NAMES)


def test_render_strip_keeps_every_nth_frame_scaled() -> None:
    frames = [(np.full((4, 4, 3), 10 * i, np.uint8), f"a{i}") for i in range(7)]
    strip = render_strip([frames], every=3, scale=2)
    cell_w = 4 * 2 + 2                                   # scaled frame + gutter
    assert strip.shape[1] == 3 * cell_w                  # frames 0, 3, 6
    for k, index in enumerate((0, 3, 6)):
        assert (strip[:8, k * cell_w: k * cell_w + 8] == 10 * index).all()


def test_cli_rows_are_the_envs_frames(tmp_path) -> None:
    out = tmp_path / "s.png"
    assert main(["--world", "breakout", "--plan", "right*2", "--plan", "left*2", "--every", "2",
                 "--seed", "3", "--scale", "1", "--out", str(out)]) == 0
    strip = cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB)
    env = WorldModelEnv(world="breakout", horizon=None, timing_in_info=False)
    h, w = env.observation_space.shape[:2]
    band = strip.shape[0] // 2                           # two rows of equal height
    for row, action in enumerate((2, 3)):
        first, _ = env.reset(seed=3)
        env.step(action)
        second, *_ = env.step(action)
        top = row * band
        assert np.array_equal(strip[top: top + h, :w], first)              # frame 0: the context
        assert np.array_equal(strip[top: top + h, w + 2: 2 * w + 2], second)  # frame 2 of this plan


def test_cli_bad_plan_exits_2_and_writes_nothing(tmp_path, capsys) -> None:
    out = tmp_path / "s.png"
    assert main(["--world", "breakout", "--plan", "jump*2", "--out", str(out)]) == 2
    assert "NOOP, FIRE, RIGHT, LEFT" in capsys.readouterr().err and not out.exists()
