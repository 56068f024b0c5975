"""The generic training loop, driven by a toy objective whose gradients are known."""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
from omegaconf import OmegaConf

from train import UsageError
from train.app import compose_config
from train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from train.ema import EMA
from train.interrupt import Stopped
from train.loop import train
from train.objectives import EMASpec, Objective, OptimSpec, register

GEN_EVERY = 5  # the generator steps every 5th iteration, the critic every iteration (DMD's schedule)


@dataclass
class ToyConfig:
    lr: float = 0.01
    ema_decay: float = 0.9
    ema_start: int = 1
    crash_at: int = -1     # raise at this step, to simulate a killed run
    signal_at: int = -1    # send this process `signal_name` in this step (once per micro-batch)
    signal_name: str = "SIGTERM"
    spike_at: int = -1     # the generator's gradient is x1000 at this step
    gen_skip: float | None = None  # OptimSpec.skip_grad_norm of the generator


class Crash(RuntimeError):
    pass


@register("toy")
class Toy(Objective):
    """Two networks, DMD-like schedule. `gen` minimises -sum(w) (gradient -1 everywhere, whatever
    the batch, so every Adam step moves each weight by exactly +lr); `critic` regresses a feature of the batch's frames plus fresh noise, so its
    weights depend on the data order and on the RNG stream (what resume must restore)."""

    Config = ToyConfig
    last: Toy | None = None  # the most recent instance, so tests can look at its networks

    def __init__(self, cfg: ToyConfig, ctx) -> None:
        super().__init__(cfg, ctx)
        self.gen = nn.Linear(3, 1, bias=False)
        nn.init.zeros_(self.gen.weight)
        self.critic = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
        self.frozen = nn.Linear(3, 3)  # checkpointed, never trained
        self.calls: list[tuple[int, str]] = []
        self.shared: list[int] = []   # ctx.shared_randint draws: must agree across ranks
        self.private: list[float] = []  # plain torch.rand draws: must differ across ranks
        Toy.last = self

    def networks(self) -> dict[str, nn.Module]:
        return {"gen": self.gen, "critic": self.critic, "frozen": self.frozen}

    def optimizers(self) -> dict[str, OptimSpec]:
        c = self.cfg
        return {"gen": OptimSpec(("gen",), lr=c.lr, grad_clip=None, skip_grad_norm=c.gen_skip,
                                 ema=(EMASpec("gen", c.ema_decay, c.ema_start),)),
                "critic": OptimSpec(("critic",), lr=c.lr, weight_decay=0.1, grad_clip=1.0)}

    def updates(self, step: int) -> list[str]:
        return ["gen", "critic"] if step % GEN_EVERY == 0 else ["critic"]

    def loss(self, name: str, batch, step: int, nets: Mapping[str, nn.Module]):
        if step == self.cfg.crash_at:
            raise Crash(f"simulated crash at step {step}")
        if step == self.cfg.signal_at and name == "critic":
            os.kill(os.getpid(), getattr(signal, self.cfg.signal_name))
        self.calls.append((step, name))
        if name == "gen":  # through the (wrapped) module's forward, as every objective must
            x = torch.ones(1, 3, device=self.ctx.device)
            scale = 1000.0 if step == self.cfg.spike_at else 1.0
            return -scale * nets["gen"](x).float().sum(), {}
        self.shared.append(int(self.ctx.shared_randint(0, 10**6)))
        self.private.append(float(torch.rand(())))
        x = batch["frames"].float().mean(dim=(1, 2, 3)) / 255.0  # (B, 3)
        target = x.sum(-1, keepdim=True) + 0.1 * torch.randn(x.shape[0], 1, device=x.device)
        pred = nets["critic"](nets["frozen"](x))
        return (pred.float() - target).pow(2).mean(), {"target_mean": target.mean()}

    def evaluate(self, step: int, nets: Mapping[str, nn.Module], batches) -> dict[str, float]:
        return {"gen_w": float(self.gen.weight.mean())}

    def export(self, out_dir: Path, weights, batches) -> None:
        torch.save(weights, out_dir / "toy.pt")


def toy_cfg(run_dir: Path, *overrides: str, **stage):
    cfg = compose_config(["stage=tokenizer", "data=synthetic", "model=tiny", f"run_dir={run_dir}",
                          "data.clip_len=2", "data.batch_size=4", "data.synthetic.episodes=4",
                          "data.synthetic.episode_len=16", "progress=false", "log_every=1",
                          "device=cpu", *overrides])
    cfg.stage = OmegaConf.create({"name": "toy", **stage})
    return cfg


def test_known_gradient_alternation_and_ema(tmp_path: Path) -> None:
    lr = 0.01
    train(toy_cfg(tmp_path / "run", "max_steps=10", "grad_accum=2", "eval_every=10", lr=lr))
    toy = Toy.last
    # updates(): the generator on steps 0 and 5 (before the critic), the critic on every step;
    # each update draws grad_accum=2 micro-batches.
    gen_steps = [s for s, n in toy.calls if n == "gen"]
    assert gen_steps == [0, 0, 5, 5]
    assert sum(n == "critic" for _, n in toy.calls) == 20
    assert toy.calls[:4] == [(0, "gen"), (0, "gen"), (0, "critic"), (0, "critic")]
    # Known gradient: a constant -1 (also summed over 2 half-weighted micro-batches), so each Adam
    # step is +lr on every weight (bias-corrected m / sqrt(v) = -1).
    assert torch.allclose(toy.gen.weight, torch.full((1, 3), 2 * lr), atol=1e-6)
    ck = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert ck["counts"] == {"gen": 2, "critic": 10}
    # EMA from update 1 on (ema_start=1): reset to w1 = lr, then one update towards w2 = 2 lr
    # with the warm-up's first decay min(0.9, 1/10) = 0.1.
    expect = 0.1 * lr + 0.9 * (2 * lr)
    assert torch.allclose(ck["ema"]["gen"]["shadow"]["weight"], torch.full((1, 3), expect), atol=1e-6)
    # The frozen network is checkpointed and untouched; the export carries the EMA weights.
    assert torch.equal(ck["networks"]["frozen"]["weight"], toy.frozen.weight.detach())
    exported = torch.load(tmp_path / "run" / "export" / "toy.pt")
    assert torch.allclose(exported["gen"]["weight"], torch.full((1, 3), expect), atol=1e-6)
    # Evaluation scored the EMA weights (what the export carries); the live ones were put back.
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval/gen_w"] for r in evals if "eval/gen_w" in r] == pytest.approx([expect])
    assert torch.allclose(toy.gen.weight, torch.full((1, 3), 2 * lr), atol=1e-6)
    assert (tmp_path / "run" / "metrics.png").exists()


def test_skip_grad_norm_drops_the_spiked_update_only(tmp_path: Path) -> None:
    """The generator updates at steps 0, 5, 10, 15; its gradient norm is sqrt(3) (= 1.73), and
    sqrt(3) * 1000 at step 5. With skip_grad_norm=10 that update is dropped: no Adam step, no
    update count, no EMA update; the other three each move the weights by +lr."""
    lr = 0.01
    train(toy_cfg(tmp_path / "run", "max_steps=20", lr=lr, spike_at=5, gen_skip=10.0, ema_start=100))
    toy = Toy.last
    assert [s for s, n in toy.calls if n == "gen"] == [0, 5, 10, 15]
    assert torch.allclose(toy.gen.weight, torch.full((1, 3), 3 * lr), atol=1e-6)
    ck = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert ck["counts"]["gen"] == 3
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = {r["step"] - 1: r["gen/skipped"] for r in logs if "gen/skipped" in r}
    assert skipped == {0: 0.0, 5: 1.0, 10: 0.0, 15: 0.0}
    # Without the guard the spike is taken and lingers in Adam's second moment, shrinking every
    # later step: the same run lands where a plain AdamW fed gradients -1, -1000, -1, -1 does.
    train(toy_cfg(tmp_path / "plain", "max_steps=20", lr=lr, spike_at=5, ema_start=100))
    w = torch.zeros(3, requires_grad=True)
    ref = torch.optim.AdamW([w], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    for g in (-1.0, -1000.0, -1.0, -1.0):
        w.grad = torch.full((3,), g)
        ref.step()
    assert float(w.detach()[0]) < 3.1 * lr  # four steps, yet barely more than the guarded run's three
    assert torch.allclose(Toy.last.gen.weight, w.detach()[None], atol=1e-6)


def test_ema_matches_hand_computation() -> None:
    net = nn.Linear(2, 2)
    ema = EMA(net, decay=0.75, warmup=False)
    w0 = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    assert torch.allclose(ema.shadow["weight"], 0.75 * w0 + 0.25 * (w0 + 1.0))
    with torch.no_grad():
        net.weight.mul_(2.0)
    ema.update(net)
    expect = 0.75 * (0.75 * w0 + 0.25 * (w0 + 1.0)) + 0.25 * 2 * (w0 + 1.0)
    assert torch.allclose(ema.shadow["weight"], expect)


def test_ema_warmup_decay_schedule_and_reset() -> None:
    net = nn.Linear(1, 1, bias=False)
    ema = EMA(net, decay=0.5)
    w = [net.weight.item()]
    expect = w[0]
    for n in range(10):  # decays 1/10, 2/11, ... up to 9/18, then capped at 0.5
        d = min(0.5, (1 + n) / (10 + n))
        assert abs(ema.current_decay() - d) < 1e-12
        with torch.no_grad():
            net.weight.add_(1.0)
        ema.update(net)
        expect = d * expect + (1 - d) * net.weight.item()
        assert abs(float(ema.shadow["weight"]) - expect) < 1e-5
    assert ema.current_decay() == 0.5
    ema.reset(net)
    assert ema.updates == 0 and abs(ema.current_decay() - 0.1) < 1e-12


def assert_same(a, b, path: str = "") -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{i}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def test_resume_is_bit_exact(tmp_path: Path) -> None:
    common = ("max_steps=12", "ckpt_every=4", "keep_ckpts=2", "grad_accum=2")
    train(toy_cfg(tmp_path / "whole", *common))
    with pytest.raises(Crash):  # killed during step 10: the newest checkpoint is step 8
        train(toy_cfg(tmp_path / "resumed", *common, crash_at=10))
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step_00000004.pt", "step_00000008.pt"]
    train(toy_cfg(tmp_path / "resumed", *common))  # the same command again: continues from step 8
    a = load_checkpoint(latest_checkpoint(tmp_path / "whole"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "resumed"))
    assert a["step"] == b["step"] == 12
    for key in ("networks", "optimizers", "ema", "counts", "rng", "data", "scalers"):
        assert_same(a[key], b[key], key)
    # The metrics log of the resumed run has no duplicated steps.
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    steps = [r["step"] for r in records if "lr/gen" in r]  # training records (evaluation's are apart)
    assert steps == sorted(set(steps)) == list(range(1, 13))


def test_sigterm_stops_after_the_step_with_checkpoint_and_export_then_resumes_bit_exact(tmp_path: Path) -> None:
    common = ("max_steps=12", "ckpt_every=100", "grad_accum=2")
    train(toy_cfg(tmp_path / "whole", *common))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped) as stopped:  # the signal arrives inside step 6 (0-based): 7 steps done
        train(toy_cfg(tmp_path / "resumed", *common, signal_at=6))
    assert (stopped.value.signum, stopped.value.step) == (signal.SIGTERM, 7)
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    assert load_checkpoint(latest_checkpoint(tmp_path / "resumed"))["step"] == 7
    assert json.loads((tmp_path / "resumed" / "export" / "wallclock.json").read_text())["steps"] == 7
    train(toy_cfg(tmp_path / "resumed", *common))
    a = load_checkpoint(latest_checkpoint(tmp_path / "whole"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "resumed"))
    for key in ("step", "networks", "optimizers", "ema", "counts", "rng", "data", "scalers"):
        assert_same(a[key], b[key], key)


def test_second_ctrl_c_stops_at_once(tmp_path: Path) -> None:
    # grad_accum=2: two SIGINTs within step 5; the second one raises before the step completes, so
    # only the periodic checkpoint (step 4) is on disk and nothing is exported.
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(toy_cfg(tmp_path / "run", "max_steps=12", "ckpt_every=4", "grad_accum=2",
                      signal_at=5, signal_name="SIGINT"))
    assert load_checkpoint(latest_checkpoint(tmp_path / "run"))["step"] == 4
    assert not (tmp_path / "run" / "export").exists()
    assert signal.getsignal(signal.SIGINT) is before


# ----- two processes, gloo -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, run_root: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = {}
    for parallel in ("ddp", "fsdp"):
        train(toy_cfg(Path(run_root) / parallel, "max_steps=6", "ckpt_every=3", f"parallel={parallel}"))
        toy = Toy.last
        # Under FSDP the live weights are shards: compare the gathered (checkpointed) ones.
        ck = load_checkpoint(latest_checkpoint(Path(run_root) / parallel))
        result[parallel] = {"checkpoint": ck["networks"], "calls": toy.calls, "shared": toy.shared,
                            "private": toy.private}
        if parallel == "ddp":
            result[parallel]["live"] = {k: v.detach().clone() for k, v in toy.critic.state_dict().items()}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_process_ddp_and_fsdp_keep_ranks_identical(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path / "runs"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert_same(r0["ddp"]["live"], r1["ddp"]["live"])
    # Both ranks did the same updates in the same order (collectives line up).
    assert r0["ddp"]["calls"] == r1["ddp"]["calls"]
    # Shared random choices agree; per-rank noise does not.
    assert r0["ddp"]["shared"] == r1["ddp"]["shared"] and len(set(r0["ddp"]["shared"])) > 1
    assert all(a != b for a, b in zip(r0["ddp"]["private"], r1["ddp"]["private"]))
    # The ranks saw different data (sharded), yet DDP and FSDP train the same model the same way.
    for k, v in r0["ddp"]["checkpoint"]["critic"].items():
        assert torch.allclose(v, r0["fsdp"]["checkpoint"]["critic"][k], atol=1e-5), k
    # The critic moved: gradients flowed.
    assert not torch.equal(r0["ddp"]["checkpoint"]["critic"]["0.weight"],
                           r0["ddp"]["checkpoint"]["critic"]["0.weight"] * 0)


def test_max_minutes_stops_exports_and_resumes(tmp_path: Path) -> None:
    # A deadline already passed after the first step: checkpoint + export at step 1, not 6.
    train(toy_cfg(tmp_path / "run", "max_steps=6", "max_minutes=1e-9", lr=0.01))
    assert load_checkpoint(latest_checkpoint(tmp_path / "run"))["step"] == 1
    assert (tmp_path / "run" / "export" / "toy.pt").exists()
    first = json.loads((tmp_path / "run" / "export" / "wallclock.json").read_text())
    assert first["steps"] == 1 and first["seconds"] > 0
    # The same command without the deadline resumes from there and runs the remaining 5 steps.
    train(toy_cfg(tmp_path / "run", "max_steps=6", lr=0.01))
    assert [s for s, n in Toy.last.calls if n == "critic"] == [1, 2, 3, 4, 5]
    assert load_checkpoint(latest_checkpoint(tmp_path / "run"))["step"] == 6
    total = json.loads((tmp_path / "run" / "export" / "wallclock.json").read_text())
    assert total["steps"] == 6 and total["seconds"] > first["seconds"]  # summed over both calls


# ----- checkpoints by time, damaged checkpoints ---------------------------------------------------


def test_checkpoint_by_time_before_ckpt_every(tmp_path: Path) -> None:
    # ckpt_every is never reached before the kill: only the clock can save the work
    with pytest.raises(Crash):
        train(toy_cfg(tmp_path / "timed", "max_steps=12", "ckpt_every=500", "ckpt_minutes=1e-9", crash_at=4))
    assert load_checkpoint(latest_checkpoint(tmp_path / "timed"))["step"] == 4
    with pytest.raises(Crash):  # a threshold not yet reached writes nothing
        train(toy_cfg(tmp_path / "untimed", "max_steps=12", "ckpt_every=500", "ckpt_minutes=60", crash_at=4))
    assert latest_checkpoint(tmp_path / "untimed") is None
    train(toy_cfg(tmp_path / "timed", "max_steps=12", "ckpt_every=500"))  # resumes from step 4
    assert [s for s, n in Toy.last.calls if n == "critic"] == list(range(4, 12))


def test_checkpoint_clock_restarts_after_each_checkpoint(tmp_path: Path, monkeypatch) -> None:
    import train.loop as loop
    now = [0.0]  # one minute per step, as the loop reads the clock
    real = loop.time.perf_counter

    class Clock:
        @staticmethod
        def perf_counter() -> float:
            return now[0]

        time = staticmethod(loop.time.time)

    def tick(*args, **kwargs):
        now[0] += 60.0
        return real()

    monkeypatch.setattr(loop, "time", Clock)
    monkeypatch.setattr(Toy, "updates", lambda self, step: (tick(), ["critic"])[1])
    train(toy_cfg(tmp_path / "run", "max_steps=7", "ckpt_every=500", "ckpt_minutes=2.5", "keep_ckpts=0"))
    # due after 3 minutes without one (steps 3 and 6), and the last step always
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(tmp_path / "run")] == [3, 6, 7]


def test_truncated_latest_checkpoint_falls_back_to_the_older_one(tmp_path: Path, capsys) -> None:
    common = ("max_steps=12", "ckpt_every=4", "keep_ckpts=3")
    train(toy_cfg(tmp_path / "whole", *common))
    with pytest.raises(Crash):
        train(toy_cfg(tmp_path / "run", *common, crash_at=10))
    newest = latest_checkpoint(tmp_path / "run")
    assert newest.name == "step_00000008.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    capsys.readouterr()
    train(toy_cfg(tmp_path / "run", *common))
    err = "".join(capsys.readouterr())
    assert f"warning: checkpoint {newest} is unreadable" in err
    assert "from the newest readable checkpoint, step_00000004.pt (step 4)" in err
    assert [s for s, n in Toy.last.calls if n == "critic"] == list(range(4, 12))
    assert (newest.parent / "step_00000008.pt.damaged").exists()  # kept, no longer in the way
    a = load_checkpoint(latest_checkpoint(tmp_path / "whole"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    for key in ("step", "networks", "optimizers", "ema", "counts", "rng", "data", "scalers"):
        assert_same(a[key], b[key], key)


def test_no_readable_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    train(toy_cfg(tmp_path / "run", "max_steps=4", "ckpt_every=2"))
    for path in list_checkpoints(tmp_path / "run"):
        path.write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match=r"no readable checkpoint in .*step_00000002\.pt, step_00000004\.pt"
                                         r".*run_dir="):
        train(toy_cfg(tmp_path / "run", "max_steps=6"))
    assert len(list_checkpoints(tmp_path / "run")) == 2  # nothing renamed or deleted
