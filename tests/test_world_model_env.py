"""The world-model env honours Gymnasium's contract: spaces, seeding, autoreset, clear errors."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from gymnasium.vector import AutoresetMode

import envs  # noqa: F401  (registers WorldModel-v0)
from envs import worlds
from envs.world_model_env import WorldModelEnv, WorldModelVectorEnv, default_world_path
from episodes.writer import EpisodeWriter
from tests.conftest import make_tiny_world
from worldmodel.checkpoint import CheckpointError, save_world


pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("worlds") / "tiny.safetensors"
    save_world(path, make_tiny_world(), dtype=None)
    return str(path)


@pytest.fixture(scope="module")
def bare_ckpt(tmp_path_factory):
    """A world with no reward heads and no context frames."""
    world = make_tiny_world()
    world.reward, world.context_frames, world.context_actions = None, None, None
    path = tmp_path_factory.mktemp("worlds") / "bare.safetensors"
    save_world(path, world, dtype=None)
    return str(path)


def rollout(env, seed, actions):
    obs, _ = env.reset(seed=seed)
    out = [obs]
    for a in actions:
        obs, *_ = env.step(a)
        out.append(obs)
    return np.stack(out)


def test_check_env_passes_with_default_arguments(ckpt):
    # no timing_in_info argument: the checker's determinism check compares infos, and wall-clock
    # latencies differ between two identical rollouts
    env = gym.make("WorldModel-v0", checkpoint=ckpt)
    check_env(env.unwrapped)
    env.close()


def test_timing_is_opt_in(ckpt):
    env = WorldModelEnv(checkpoint=ckpt, steps=1)
    env.reset(seed=0)
    assert "latency_ms" not in env.step(0)[4] and env.runtime.engine.latency_ms > 0
    vec = WorldModelVectorEnv(num_envs=2, checkpoint=ckpt, steps=1)
    vec.reset(seed=0)
    assert "latency_ms" not in vec.step(np.array([0, 1]))[4]


def test_step_before_reset_is_a_clear_error(ckpt, bare_ckpt):
    for path in (bare_ckpt, ckpt):  # bare: it used to run and warn about missing reward heads
        env = gym.make("WorldModel-v0", checkpoint=path, steps=1)
        with pytest.raises(gym.error.ResetNeeded, match="reset"):  # gymnasium's own wrapper
            env.step(0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "no reward heads" warning on the way
            with pytest.raises(gym.error.ResetNeeded, match=r"before env\.reset\(\)"):
                env.unwrapped.step(0)
            vec = WorldModelVectorEnv(num_envs=2, checkpoint=path, steps=1)
            with pytest.raises(gym.error.ResetNeeded, match=r"before env\.reset\(\)"):
                vec.step(np.array([0, 1]))
            with pytest.raises(gym.error.ResetNeeded, match="without reset_mask"):
                vec.reset(options={"reset_mask": np.array([True, False])})
    env.unwrapped.reset(seed=0)  # and once reset, it steps
    assert env.unwrapped.step(0)[0].shape == (32, 32, 3)


def test_spaces_info_and_render(ckpt):
    env = gym.make("WorldModel-v0", checkpoint=ckpt, steps=1, render_mode="rgb_array", timing_in_info=True)
    assert env.observation_space == gym.spaces.Box(0, 255, (32, 32, 3), np.uint8)
    assert env.action_space == gym.spaces.Discrete(4)
    obs, info = env.reset(seed=0)
    assert obs.dtype == np.uint8 and info["step"] == 0
    obs, reward, terminated, truncated, info = env.step(1)
    assert info["step"] == 1 and info["steps"] == 1 and info["latency_ms"] > 0
    assert isinstance(reward, float) and reward in (-1.0, 0.0, 1.0) and isinstance(terminated, bool)
    frame = env.render()
    assert np.array_equal(frame, obs) and frame is not obs


@pytest.mark.parametrize("context", ["real", "noise"])
def test_seeded_rollouts_repeat_and_differ_by_seed(ckpt, context):
    actions = [0, 3, 1, 1, 2, 0]
    env = gym.make("WorldModel-v0", checkpoint=ckpt, context=context)
    a, b, c = (rollout(env, seed, actions) for seed in (7, 7, 8))
    other = rollout(gym.make("WorldModel-v0", checkpoint=ckpt, context=context), 7, actions)
    assert np.array_equal(a, b) and np.array_equal(a, other)
    assert not np.array_equal(a, c)


def test_real_context_starts_from_a_checkpoint_frame(ckpt):
    env = WorldModelEnv(checkpoint=ckpt)
    real = env.runtime.engine.world.context_frames.numpy()
    for seed in range(4):
        obs, _ = env.reset(seed=seed)
        assert any(np.array_equal(obs, f) for f in real)


def test_truncation_at_horizon(ckpt):
    env = gym.make("WorldModel-v0", checkpoint=ckpt, horizon=3, steps=1)
    env.reset(seed=0)
    flags = [env.step(0)[3] for _ in range(3)]
    assert flags == [False, False, True]


def test_no_reward_heads_zero_reward_one_warning(bare_ckpt):
    env = WorldModelEnv(checkpoint=bare_ckpt, steps=1)  # no context frames: first frame from noise
    env.reset(seed=0)
    with pytest.warns(UserWarning, match="no reward heads"):
        _, reward, terminated, _, _ = env.step(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            _, reward, terminated, _, _ = env.step(1)
    assert reward == 0.0 and terminated is False


def test_invalid_action_clear_error(ckpt):
    env = gym.make("WorldModel-v0", checkpoint=ckpt).unwrapped
    env.reset(seed=0)
    for bad in (4, -1, 1.5):
        with pytest.raises(gym.error.InvalidAction, match=r"0\.\.3"):
            env.step(bad)
    with pytest.raises(ValueError, match=r"0\.\.3"):  # also a ValueError for plain callers
        env.step(9)
    vec = gym.make_vec("WorldModel-v0", num_envs=2, vectorization_mode="vector_entry_point", checkpoint=ckpt)
    vec.reset(seed=0)
    with pytest.raises(ValueError, match=r"world 1.*0\.\.3"):
        vec.step(np.array([0, 7]))
    with pytest.raises(ValueError, match="one per world"):
        vec.step(np.array([0, 1, 2]))


def test_bad_arguments_are_named(ckpt):
    with pytest.raises(TypeError, match="stepz"):
        gym.make("WorldModel-v0", checkpoint=ckpt, stepz=2)
    with pytest.raises(ValueError, match="steps must be one of"):
        gym.make("WorldModel-v0", checkpoint=ckpt, steps=3)
    with pytest.raises(ValueError, match="horizon"):
        gym.make("WorldModel-v0", checkpoint=ckpt, horizon=0)


def test_missing_default_world_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(worlds, "worlds_dir", lambda: tmp_path)
    assert default_world_path.__module__ == "envs.worlds"
    with pytest.raises(CheckpointError, match="checkpoint="):
        gym.make("WorldModel-v0")
    with pytest.raises(CheckpointError, match="does not exist"):
        gym.make("WorldModel-v0", checkpoint=str(tmp_path / "nope.safetensors"))


def test_shipped_world_by_name(tmp_path, monkeypatch, ckpt):
    monkeypatch.setattr(worlds, "worlds_dir", lambda: tmp_path)
    (tmp_path / "doom.safetensors").write_bytes(open(ckpt, "rb").read())
    (tmp_path / "breakout.safetensors").write_bytes(open(ckpt, "rb").read())
    assert default_world_path() == tmp_path / "breakout.safetensors"
    assert worlds.shipped_worlds() == ["breakout", "doom"]
    env = gym.make("WorldModel-v0")  # the default world, no path given
    assert env.unwrapped.runtime.path == tmp_path / "breakout.safetensors"
    assert env.reset(seed=0)[0].shape == (32, 32, 3)
    assert gym.make("WorldModel-v0", world="breakout").unwrapped.runtime.path == tmp_path / "breakout.safetensors"


def test_make_vec_steps_and_autoresets_next_step(ckpt):
    b, horizon = 4, 3
    vec = gym.make_vec("WorldModel-v0", num_envs=b, vectorization_mode="vector_entry_point",
                       checkpoint=ckpt, horizon=horizon, steps=1, timing_in_info=True)
    assert isinstance(vec, WorldModelVectorEnv)
    assert vec.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    assert vec.observation_space.shape == (b, 32, 32, 3) and vec.action_space.shape == (b,)
    obs, info = vec.reset(seed=0)
    assert obs.shape == (b, 32, 32, 3) and obs.dtype == np.uint8 and list(info["step"]) == [0] * b
    ended = np.zeros(b, bool)
    for t in range(2 * horizon + 2):
        obs, rew, term, trunc, info = vec.step(vec.action_space.sample())
        assert obs.shape == (b, 32, 32, 3) and rew.shape == term.shape == trunc.shape == (b,)
        # NEXT_STEP: a world that ended last step restarts now with reward 0 and no flags
        assert np.all(rew[ended] == 0) and not term[ended].any() and not trunc[ended].any()
        assert np.all(info["step"][ended] == 0) and np.all(info["step"] <= horizon)
        assert np.all(trunc == (info["step"] == horizon))
        ended = term | trunc
    assert info["latency_ms"].shape == (b,)


def test_vector_batch_of_one_equals_single_env(ckpt):
    actions = [2, 0, 1, 3, 3]
    single = rollout(WorldModelEnv(checkpoint=ckpt, steps=2), 11, actions)
    vec = WorldModelVectorEnv(num_envs=1, checkpoint=ckpt, steps=2)
    frames = [vec.reset(seed=11)[0]] + [vec.step(np.array([a]))[0] for a in actions]
    np.testing.assert_array_equal(np.concatenate(frames), single)


def test_vector_seeded_and_partial_reset(ckpt):
    def run(seed):
        vec = WorldModelVectorEnv(num_envs=3, checkpoint=ckpt, steps=1, horizon=None)
        out = [vec.reset(seed=seed)[0]]
        for t in range(4):
            out.append(vec.step(np.array([t % 4, 1, 2]))[0])
        before = vec.elapsed.copy()
        obs, info = vec.reset(options={"reset_mask": np.array([False, True, False])})
        assert list(info["step"]) == [before[0], 0, before[2]]
        out.append(obs)
        return np.stack(out)

    a, b, c = run(1), run(1), run(2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_dataset_context_and_action_mismatch(ckpt, tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    meta = {"game": "tiny", "fps": 15, "action_names": ["a0", "a1", "a2", "a3"]}
    with EpisodeWriter(tmp_path / "data", meta, (32, 32, 3), codec="png") as writer:
        for i, f in enumerate(frames):
            writer.add(f, -1 if i == 0 else i % 4)
    env = WorldModelEnv(checkpoint=ckpt, context=str(tmp_path / "data"), context_length=4)
    for seed in range(3):
        obs, _ = env.reset(seed=seed)
        assert any(np.array_equal(obs, f) for f in frames[3:])  # a 4-frame window's last frame
    env.step(0)
    with EpisodeWriter(tmp_path / "other", {**meta, "action_names": ["x", "y"]}, (32, 32, 3)) as writer:
        writer.add(frames[0], -1)
    with pytest.raises(ValueError, match="recorded with actions"):
        WorldModelEnv(checkpoint=ckpt, context=str(tmp_path / "other"))


def test_image_context_and_reset_options(ckpt, tmp_path):
    import cv2
    img = np.zeros((32, 32, 3), np.uint8)
    img[4:12, 4:20] = (255, 0, 0)
    cv2.imwrite(str(tmp_path / "start.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    env = WorldModelEnv(checkpoint=ckpt, context=str(tmp_path / "start.png"))
    assert np.array_equal(env.reset(seed=0)[0], img)
    obs, _ = env.reset(options={"context": img[::-1][None]})
    assert np.array_equal(obs, img[::-1])
    with pytest.raises(ValueError, match="neither"):
        WorldModelEnv(checkpoint=ckpt, context="somewhere/else")
