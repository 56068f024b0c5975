"""Thread choice by measured benefit, and the throw-away timing frames it runs on."""

import numpy as np
import torch

from tests.conftest import make_tiny_world
from worldmodel.engine import Engine, EngineConfig
from worldmodel.threads import choose_threads


def fake_timer(ms_by_threads: dict[int, float]):
    return lambda: [ms_by_threads[torch.get_num_threads()] / 1e3] * 3


def test_a_second_thread_is_kept_only_when_it_pays() -> None:
    before = torch.get_num_threads()
    try:
        little = choose_threads(fake_timer({1: 30.0, 2: 27.0}), counts=[1, 2])
        assert little.threads == 1 and torch.get_num_threads() == 1 and "1.11x" in little.label()
        busy = choose_threads(fake_timer({1: 30.0, 2: 200.0}), counts=[1, 2])  # another process on core 2
        assert busy.threads == 1
        pays = choose_threads(fake_timer({1: 30.0, 2: 16.0}), counts=[1, 2])
        assert pays.threads == 2 and torch.get_num_threads() == 2 and pays.frame_ms == {1: 30.0, 2: 16.0}
    finally:
        torch.set_num_threads(before)


def test_timing_frames_leave_the_world_as_it_was() -> None:
    world = make_tiny_world()
    ctx = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)

    def play(time_first: bool) -> np.ndarray:
        eng = Engine(world, EngineConfig(steps=2, sink=1, dtype="float32", seed=3))
        if time_first:  # its noise draws must not shift the stream the world then plays from
            assert len(eng.time_frames(4)) == 4 and eng.frames is None
        eng.reset(ctx)
        return np.stack([eng.step(a % 4) for a in range(6)])

    assert np.array_equal(play(False), play(True))
