"""Stage rewards: the class-balanced loss by hand, the heads learning a rare rule, the stage through
the loop on a recorded dataset, and attaching the heads to a world."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from episodes.writer import EpisodeWriter
from tests.conftest import make_tiny_world
from train.app import main as train_main
from train.objectives import TrainContext
from train.objectives.rewards import (RareMemory, RewardsConfig, RewardsObjective, attach_rewards,
                                      balanced_losses, classification_metrics, inverse_frequency,
                                      save_reward_export, sign_classes)
from worldmodel.checkpoint import CheckpointError, load_world, save_world
from worldmodel.reward import RewardConfig, RewardHeads


pytestmark = pytest.mark.usefixtures("one_thread")

def test_inverse_frequency_weights_make_every_class_count_equally() -> None:
    counts = torch.tensor([10.0, 80.0, 10.0])
    w = inverse_frequency(counts, prior=0.0)
    torch.testing.assert_close(w, torch.tensor([10 / 3, 5 / 12, 10 / 3]))
    torch.testing.assert_close(counts * w, torch.full((3,), 100 / 3))       # equal total weight per class
    assert math.isclose(float((counts * w).sum() / counts.sum()), 1.0)       # loss scale kept
    assert inverse_frequency(torch.tensor([0.0, 5.0]), prior=1.0)[0] == 7 / 2  # unseen class: finite
    assert inverse_frequency(torch.tensor([0.0, 1e6]), prior=1.0, max_weight=50.0)[0] == 50.0


def test_balanced_loss_on_a_hand_made_case() -> None:
    labels = torch.tensor([1, 1, 1, 2])
    w = inverse_frequency(torch.bincount(labels, minlength=3).double(), prior=1.0)  # p = 1/7, 4/7, 2/7
    torch.testing.assert_close(w, torch.tensor([7 / 3, 7 / 12, 7 / 6]))
    ends = torch.tensor([False, False, False, True])
    ew = torch.tensor([0.5, 3.0])
    r, e = balanced_losses(torch.zeros(4, 3), torch.zeros(4), labels, ends, w, ew)
    assert math.isclose(float(r), (3 * 7 / 12 + 7 / 6) * math.log(3) / 4, rel_tol=1e-6)
    assert math.isclose(float(e), (3 * 0.5 + 3.0) * math.log(2) / 4, rel_tol=1e-6)
    # no weights: the plain mean
    r, _ = balanced_losses(torch.zeros(4, 3), torch.zeros(4), labels, ends, None, None)
    assert math.isclose(float(r), math.log(3), rel_tol=1e-6)


def test_sign_classes_and_metrics() -> None:
    assert sign_classes(torch.tensor([-3.0, 0.0, 0.5, 1.0])).tolist() == [0, 1, 2, 2]
    labels = torch.tensor([1, 1, 1, 1, 2, 0])
    logits = torch.nn.functional.one_hot(torch.tensor([1, 1, 1, 2, 2, 1]), 3).float()
    ends = torch.tensor([0, 0, 0, 1, 0, 0]).bool()
    m = classification_metrics(logits, torch.tensor([-1.0, -1, -1, 1, 1, -1]), labels, ends)
    assert m["reward_recall"] == {"negative": 0.0, "zero": 0.75, "positive": 1.0}
    assert math.isclose(m["reward_balanced_accuracy"], (0 + 0.75 + 1) / 3)
    assert m["nonzero_recall"] == 0.5 and m["nonzero_precision"] == 0.5
    assert m["end_recall"] == 1.0 and m["end_precision"] == 0.5
    assert math.isclose(m["end_balanced_accuracy"], (1 + 4 / 5) / 2)


def rule_batch(g: torch.Generator, b: int = 64) -> TensorDict:
    """Rare, trivially learnable labels: action 1 gives +1, action 2 gives -1 (5% each); the
    episode ends when channel 0 of the new frame is bright on average (~5%)."""
    lat = torch.randn(b, 2, 4, 4, 4, generator=g)
    u = torch.rand(b, generator=g)
    acts = torch.where(u < 0.05, 1, torch.where(u < 0.10, 2, torch.where(u < 0.55, 0, 3)))
    acts = torch.stack([torch.full_like(acts, -1), acts], 1)
    rewards = torch.zeros(b, 2)
    rewards[:, 1] = (acts[:, 1] == 1).float() - (acts[:, 1] == 2).float()
    term = torch.zeros(b, 2, dtype=torch.bool)
    term[:, 1] = lat[:, 1, ..., 0].mean(dim=(1, 2)) > 0.41
    return TensorDict({"latents": lat, "actions": acts, "rewards": rewards, "terminated": term},
                      batch_size=[b, 2])


def make_objective(tmp_path: Path, hidden: int = 16, **cfg) -> RewardsObjective:
    tok = tmp_path / "tok"
    tok.mkdir(exist_ok=True)
    (tok / "tokenizer.json").write_text(json.dumps({"config": {"latent_size": 4, "latent_channels": 4}}))
    ctx = TrainContext(device=torch.device("cpu"), dtype=torch.float32, rank=0, world_size=1,
                       run_dir=tmp_path, init_from=None, model={}, seed=0,
                       extra={"action_names": ["a", "b", "c", "d"]})
    return RewardsObjective(RewardsConfig(tokenizer=str(tok), hidden=hidden, eval_batches=16, **cfg), ctx)


def test_heads_learn_a_rare_rule_with_the_balanced_loss(tmp_path: Path) -> None:
    torch.manual_seed(0)
    obj = make_objective(tmp_path)
    heads = obj.networks()["reward"]
    opt = torch.optim.AdamW(heads.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    torch.set_flush_denormal(True)  # as the loop does: tiny gradients crawl otherwise
    try:
        for step in range(150):
            loss, logs = obj.loss("reward", rule_batch(g), step, {"reward": heads})
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_flush_denormal(False)
    assert logs["memory"] > 100  # rare transitions collected for balanced sampling
    held = torch.Generator().manual_seed(99)
    m = obj.scores(heads.eval(), iter(lambda: rule_batch(held), None))
    assert m["nonzero"] > 50 and m["ends"] > 25
    assert m["reward_balanced_accuracy"] > 0.95 and m["nonzero_recall"] > 0.95, m
    assert m["end_recall"] > 0.8 and m["end_balanced_accuracy"] > 0.85, m
    assert obj.state_dict()["reward_counts"].sum() == 150 * 64


def test_rare_memory_reservoir_and_balanced_draws() -> None:
    torch.manual_seed(0)
    mem = RareMemory(capacity=8)
    assert mem.sample(6) is None
    for step in range(10):
        labels = torch.tensor([1, 1, 2, 2, 2, 0])  # three positives and one negative per batch
        ends = torch.tensor([0, 0, 0, 0, 1, 0]).bool()
        lat = torch.full((6, 2, 2, 1), float(step))
        mem.add(lat, lat, torch.arange(6), labels, ends)
    assert mem.seen == {"negative": 10, "positive": 30, "end": 10} and len(mem) == 24
    # the reservoir is a sample of all batches, not just the latest
    assert len(set(mem.data["positive"]["prev"][:, 0, 0, 0].tolist())) > 2
    prev, cur, acts, labels, ends = mem.sample(30)
    assert len(labels) == 30 and (labels[:10] == 0).all() and (labels[10:] == 2).all() and ends[20:].all()
    copy = RareMemory(8)
    copy.load_state_dict(mem.state_dict(), torch.device("cpu"))
    assert copy.seen == mem.seen and torch.equal(copy.data["end"]["cur"], mem.data["end"]["cur"])


def test_rewards_stage_on_synthetic_data_says_what_it_needs(tmp_path: Path) -> None:
    obj = make_objective(tmp_path)
    batch = rule_batch(torch.Generator().manual_seed(0)).exclude("rewards")
    with pytest.raises(Exception, match="needs recorded rewards"):
        obj.loss("reward", batch, 0, {"reward": obj.heads})


def write_rewarded_dataset(root: Path, episodes: int = 3, length: int = 24) -> None:
    for e in range(episodes):
        meta = {"game": "toy", "action_names": ["noop", "left", "right"]}
        with EpisodeWriter(root, meta, (32, 32, 3)) as w:
            for t in range(length):
                frame = np.zeros((32, 32, 3), np.uint8)
                frame[4 + t % 20:8 + t % 20, 10 + e:14 + e] = 255
                w.add(frame, -1 if t == 0 else t % 3, reward=float(t % 7 == 3) - float(t % 11 == 5),
                      terminated=t == length - 1)


def test_rewards_stage_runs_through_the_loop_and_exports(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_rewarded_dataset(data)
    common = [f"data={data}", "model=tiny", f"runs_root={tmp_path / 'runs'}", "progress=false", "device=cpu"]
    assert train_main(["stage=tokenizer", "max_steps=1", "data.batch_size=4", "stage.norm_batches=1",
                       *common]) == 0
    assert train_main(["stage=rewards", "max_steps=3", "data.batch_size=4", "data.clip_len=4", "stage.hidden=16",
                       "stage.eval_batches=2", "eval_every=3", *common]) == 0
    export = tmp_path / "runs" / "rewards" / "export"
    meta = json.loads((export / "reward.json").read_text())
    assert (export / "reward.safetensors").exists() and meta["action_names"] == ["noop", "left", "right"]
    assert sum(meta["class_counts"]["end"]) > 0 and "reward_balanced_accuracy" in meta["metrics"]


def test_attach_rewards_rewrites_the_world_and_checks_the_fit(tmp_path: Path) -> None:
    world = make_tiny_world(num_actions=4)
    world.reward = None
    save_world(tmp_path / "world.safetensors", world)
    heads = RewardHeads(RewardConfig(latent_size=4, latent_channels=4, num_actions=4, hidden=16))
    save_reward_export(tmp_path / "rw", heads, ["a0", "a1", "a2", "a3"], tokenizer=None)
    out = attach_rewards(tmp_path / "world.safetensors", tmp_path / "rw", out=tmp_path / "with.safetensors")
    loaded = load_world(out)
    assert loaded.reward is not None
    for k, v in heads.state_dict().items():
        torch.testing.assert_close(loaded.reward.state_dict()[k], v.to(torch.bfloat16).float())
    wrong = RewardHeads(RewardConfig(latent_size=4, latent_channels=4, num_actions=7, hidden=16))
    save_reward_export(tmp_path / "bad", wrong, [f"x{i}" for i in range(7)], tokenizer=None)
    with pytest.raises(CheckpointError, match="7 actions"):
        attach_rewards(tmp_path / "world.safetensors", tmp_path / "bad")
