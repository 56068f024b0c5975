"""World checkpoints round-trip exactly and every user-caused failure gets a clear message."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import make_tiny_world
from worldmodel.checkpoint import CheckpointError, load_world, read_config, save_world
from worldmodel.engine import Engine, EngineConfig


def test_round_trip_gives_identical_rollouts(tmp_path):
    world = make_tiny_world()
    path = tmp_path / "w.safetensors"
    save_world(path, world, dtype=None)
    loaded = load_world(path)
    assert loaded.action_names == world.action_names and loaded.info["fps"] == 15
    assert torch.equal(loaded.context_frames, world.context_frames)
    assert torch.equal(loaded.context_actions, world.context_actions)
    outs = []
    for w in (world, loaded):
        eng = Engine(w, EngineConfig(steps=2, dtype="float32", seed=3))
        outs.append(np.stack([eng.reset(None)] + [eng.step(a) for a in (0, 1, 2)]))
    assert np.array_equal(outs[0], outs[1])


def test_bf16_storage_is_smaller_and_close(tmp_path):
    world = make_tiny_world()
    save_world(tmp_path / "a.safetensors", world, dtype=None)
    save_world(tmp_path / "b.safetensors", world)  # bf16 default
    assert (tmp_path / "b.safetensors").stat().st_size < (tmp_path / "a.safetensors").stat().st_size
    w = load_world(tmp_path / "b.safetensors")
    ref = world.dit.patch_in.weight
    torch.testing.assert_close(w.dit.patch_in.weight, ref, atol=1e-2, rtol=1e-2)
    assert w.tokenizer.latent_mean.dtype == torch.float32


def test_engine_load_applies_overrides(tmp_path):
    path = tmp_path / "w.safetensors"
    save_world(path, make_tiny_world())
    eng = Engine.load(path, steps=4, dtype="float32")
    assert eng.steps == 4 and eng.config.sink == 1 and eng.dtype == torch.float32


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_world(tmp_path / "nope.safetensors")


def test_a_stage_export_folder_loads_its_world_file(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    with pytest.raises(CheckpointError, match="folder without a world.safetensors"):
        load_world(export)
    save_world(export / "world.safetensors", make_tiny_world())
    assert read_config(export) == read_config(export / "world.safetensors")
    assert load_world(export).action_names == make_tiny_world().action_names


def test_truncated_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_world(path, make_tiny_world())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated|damaged"):
        load_world(path)
    path.write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="truncated or not a safetensors"):
        load_world(path)


def test_wrong_kind(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(3)}, str(path))
    with pytest.raises(CheckpointError, match="not a world checkpoint") as err:
        read_config(path)
    assert "python -m train.assemble" in str(err.value)  # the tool that makes worlds, which exists
    assert "train export" not in str(err.value)


def _flip_a_weight_byte(path) -> None:
    """Flip one byte inside a DiT weight: the file still parses, the weights are wrong."""
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")  # safetensors: u64 header size, JSON header, tensor bytes
    header = json.loads(data[8:8 + n])
    name = next(k for k, v in header.items()
                if k.startswith("dit.") and v["data_offsets"][1] - v["data_offsets"][0] > 64)
    data[8 + n + header[name]["data_offsets"][0] + 5] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_are_refused_unless_told(tmp_path):
    path = tmp_path / "w.safetensors"
    world = make_tiny_world()
    save_world(path, world, dtype=None)
    _flip_a_weight_byte(path)
    with pytest.raises(CheckpointError, match="damaged: its tensors do not match the sha256"):
        load_world(path)
    loaded = load_world(path, verify=False)  # the opt-out loads the damaged weights as they are
    differs = [n for n, t in loaded.dit.state_dict().items() if not torch.equal(t, world.dit.state_dict()[n])]
    assert len(differs) == 1


def test_world_without_a_digest_still_loads(tmp_path):
    # files written before the digest existed: no check, no error
    path = tmp_path / "w.safetensors"
    save_world(path, make_tiny_world())
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del meta["sha256"]
    save_file(tensors, str(path), metadata=meta)
    assert load_world(path).action_names == make_tiny_world().action_names


def test_config_weights_mismatch(tmp_path):
    path = tmp_path / "w.safetensors"
    world = make_tiny_world()
    save_world(path, world)
    # rewrite the metadata with a different width: weights no longer fit
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["config"])
    cfg["dit"]["width"] = 64
    meta["config"] = json.dumps(cfg)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="do not match its config"):
        load_world(path)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    save_world(tmp_path / "w.safetensors", make_tiny_world())
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
