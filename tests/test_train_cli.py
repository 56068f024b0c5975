"""The hydra app: every config composes, bad input gets one clear message and a non-zero exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from train.app import compose_config, main, options
from train.checkpoint import latest_checkpoint, load_checkpoint
from train.objectives import available_stages, get_objective


@pytest.mark.parametrize("stage", options("stage"))
@pytest.mark.parametrize("model", options("model"))
def test_every_stage_and_model_composes_with_steps(stage: str, model: str, tmp_path: Path) -> None:
    cfg = compose_config([f"stage={stage}", f"model={model}", "data=synthetic", "max_steps=2",
                          f"runs_root={tmp_path}"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["max_steps"] == 2 and resolved["stage"]["name"] == stage
    assert resolved["run_dir"].startswith(f"{tmp_path}/{stage}")  # a stage may name variants' dirs
    if stage in available_stages():  # the stage's YAML fits its config dataclass (types, names)
        cls = get_objective(stage)
        fields = {k: v for k, v in resolved["stage"].items() if k != "name"}
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls.Config), fields))

def test_data_dir_shorthand(tmp_path: Path) -> None:
    cfg = compose_config(["data=" + str(tmp_path)])
    assert cfg.data.source == "recorded" and cfg.data.path == str(tmp_path)


@pytest.mark.parametrize("argv, message", [
    (["stage=nope", "data=synthetic"], "unknown stage 'nope'"),
    (["stage=tokenizer", "model=huge", "data=synthetic"], "unknown model 'huge'"),
    (["stage=tokenizer"], "no dataset given: pass data=<dataset dir>"),
    (["stage=tokenizer", "data=does/not/exist"], "dataset directory does/not/exist does not exist"),
    (["stage=tokenizer", "data=synthetic", "init_from=no/such/export"], "no/such/export, which does not exist"),
    (["stage=tokenizer", "data=synthetic", "stepz=3"], "bad override"),
    (["stage=tokenizer", "steps"], "arguments must be key=value"),
    (["stage=tokenizer", "data=synthetic", "max_steps=0"], "max_steps=0 must be at least 1"),
    (["stage=tokenizer", "data=synthetic", "max_steps=-1"], "max_steps=-1 must be at least 1"),
    (["stage=tokenizer", "data=synthetic", "max_steps=abc"], "max_steps=abc is not a whole number"),
    (["stage=all", "data=synthetic", "stage.max_steps.dmd=0"], "max_steps=0 must be at least 1"),
    (["stage=tokenizer", "data=synthetic", "ckpt_minutes=-1"], "ckpt_minutes=-1.0 must be 0 or more"),
    (["stage=tokenizer", "data=synthetic", "dtype=f16"], "dtype=f16 is not one of"),
    (["stage=tokenizer", "data=synthetic", "device=gpu"], "device=gpu is not a device"),
])
def test_bad_input_gets_one_clear_message(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert main([*argv, f"runs_root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err


def test_bad_loop_values_stop_before_any_work(tmp_path: Path, capsys) -> None:
    # max_steps=0 used to exit 0 with an untrained export
    assert main(["stage=tokenizer", "data=synthetic", f"run_dir={tmp_path / 'run'}", "max_steps=0"]) == 2
    assert "pass e.g. max_steps=1000" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cuda_on_a_machine_without_it(tmp_path: Path, capsys, monkeypatch) -> None:
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        assert main(["stage=tokenizer", "data=synthetic", f"runs_root={tmp_path}", f"device={device}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: device={device} but this machine has no usable CUDA GPU")
        assert "device=cpu" in err and len(err.strip().splitlines()) == 1


def test_cli_subprocess_exit_code_without_traceback(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "train", "stage=nope", f"runs_root={tmp_path}"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={**os.environ,
                              "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 2
    assert "unknown stage 'nope'" in out.stderr and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written to the working directory
    for bad in ("max_steps=abc", "device=cuda"):  # a traceback inside tqdm / torch.cuda before
        out = subprocess.run([sys.executable, "-m", "train", "stage=tokenizer", "data=synthetic", bad,
                              f"runs_root={tmp_path}"], capture_output=True, text=True, cwd=tmp_path,
                             timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": "",
                                               "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        assert out.returncode == 2 and out.stderr.startswith(f"error: {bad}"), out.stderr
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_cli_sigterm_checkpoints_exports_and_exits_143(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "train", "stage=tokenizer", "data=synthetic", "model=tiny",
                             f"run_dir={run}", "max_steps=100000", "log_every=1", "progress=false", "device=cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    log = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and log.read_text().strip()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # training has begun once the first step is logged
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "rerun the same command" in err and "Traceback" not in err
    step = load_checkpoint(latest_checkpoint(run))["step"]
    assert step >= 1 and json.loads((run / "export" / "wallclock.json").read_text())["steps"] == step


def test_stage_all_routes_per_stage_options(tmp_path: Path) -> None:
    from train.pipeline import split_stage_options, stage_overrides

    argv = ["stage=all", "data=synthetic", "max_steps=3", "dmd.ema_start=50", "causal_ode.trajectories=16",
            "stage.max_steps.teacher=7", f"runs_root={tmp_path}"]
    common, own = split_stage_options(argv)
    assert own == {"dmd": ["stage.ema_start=50"], "causal_ode": ["stage.trajectories=16"]}
    cfg = compose_config(common)
    dmd = stage_overrides(common, "dmd", cfg, own)
    assert "stage=dmd" in dmd and "stage.ema_start=50" in dmd and "max_steps=3" in dmd
    assert not any(o.startswith("stage.trajectories") for o in dmd)
    assert OmegaConf.to_container(compose_config(dmd), resolve=True)["stage"]["ema_start"] == 50
    # stage.steps.<name> still sets that stage's length when no global steps= is given
    teacher = stage_overrides([a for a in common if a != "max_steps=3"], "teacher", cfg, own)
    assert "max_steps=7" in teacher


def test_stage_all_stops_after_a_paused_stage_and_checks_options_first(tmp_path: Path) -> None:
    import json

    from train import UsageError
    from train.pipeline import run_pipeline

    argv = ["stage=all", "data=synthetic", f"runs_root={tmp_path}", "max_minutes=1"]
    cfg = compose_config(argv)
    ran: list[str] = []

    def fake_stage(overrides: list[str]) -> Path:  # tokenizer finishes, the teacher pauses
        name = next(o for o in overrides if o.startswith("stage=")).split("=")[1]
        ran.append(name)
        export = tmp_path / name / "export"
        export.mkdir(parents=True)
        steps = 10 if name == "tokenizer" else 4
        (export / "wallclock.json").write_text(json.dumps({"steps": steps, "of": 10, "seconds": 1.0}))
        return export.parent

    assert run_pipeline(argv, cfg, fake_stage, {}, compose_config) is None
    assert ran == ["tokenizer", "teacher"]  # ar never started from a half-trained teacher
    # a misspelt option of a late stage fails before any stage runs
    ran.clear()
    with pytest.raises(UsageError, match="ema_strat"):
        run_pipeline(argv, cfg, fake_stage, {"dmd": ["stage.ema_strat=5"]}, compose_config)
    assert ran == []
    assert main(["stage=all", "data=synthetic", f"runs_root={tmp_path}", "dmd.ema_strat=5"]) == 2


def test_help_lists_every_option_of_a_stage(capsys) -> None:
    from train.loop import LoopConfig
    from train.objectives import get_objective
    assert main(["--help", "stage=dmd"]) == 0
    out = capsys.readouterr().out
    for f in fields(get_objective("dmd").Config):
        assert f"  stage.{f.name}=" in out, f.name
    for f in fields(LoopConfig):
        assert f"  {f.name}=" in out, f.name
    assert "stage.lr_critic=2e-06" in out and "stage.clean_context=False  scores see context" in out
    assert main(["--help", "stage=nope"]) == 2 and "nope" in capsys.readouterr().err
