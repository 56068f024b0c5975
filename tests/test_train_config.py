"""One source of truth for the training config: the stage dataclasses are the schema, the yaml
files override only what they must, old key spellings keep working with a note."""

from __future__ import annotations

import dataclasses
from importlib.resources import files

import pytest
import yaml
from omegaconf import OmegaConf

from train import UsageError
from train.app import compose_config, main, options
from train.objectives import AdamWConfig, available_stages, get_objective


def stage_yaml(name: str) -> dict:
    return yaml.safe_load(files("train.configs").joinpath("stage", f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", available_stages())
def test_stage_yaml_restates_no_default_of_its_dataclass(name: str) -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(get_objective(name).Config)}
    for key, value in (stage_yaml(name).get("stage") or {}).items():
        assert key in defaults, f"{name}.yaml sets stage.{key}, which its dataclass does not have"
        interpolated = isinstance(value, str) and "${" in value
        assert interpolated or value != defaults[key], f"{name}.yaml restates stage.{key}={value}"


@pytest.mark.parametrize("name", available_stages())
def test_composed_stage_config_is_the_dataclass_defaults_plus_the_yaml(name: str) -> None:
    stage = OmegaConf.to_container(compose_config([f"stage={name}", "data=synthetic"]).stage)
    own = stage_yaml(name).get("stage") or {}
    for f in dataclasses.fields(get_objective(name).Config):
        expected = own.get(f.name, f.default)
        got = stage[f.name]
        if isinstance(expected, str) and "${" in expected:
            continue  # an interpolation: compared unresolved below
        assert got == (list(expected) if isinstance(expected, tuple) else expected), f.name
    assert stage["name"] == name


def test_every_stage_option_overrides_without_plus_and_a_typo_names_the_help() -> None:
    cfg = compose_config(["stage=ar", "data=synthetic", "stage.motion=4", "stage.skip_grad_norm=10"])
    assert cfg.stage.motion == 4 and cfg.stage.skip_grad_norm == 10
    with pytest.raises(UsageError, match=r"stage.motoin is not an option of stage=ar; "
                                          r"`python -m train --help stage=ar`"):
        compose_config(["stage=ar", "data=synthetic", "stage.motoin=4"])


def test_every_stage_shares_the_optimizer_config() -> None:
    for name in available_stages():
        assert issubclass(get_objective(name).Config, AdamWConfig), name


def test_old_steps_spelling_still_works_with_a_note(capsys) -> None:
    cfg = compose_config(["stage=tokenizer", "data=synthetic", "steps=7"])
    assert cfg.max_steps == 7 and "steps" not in cfg
    assert "steps= is now max_steps=" in capsys.readouterr().err
    # DMD's denoising steps keep their name and are not touched
    cfg = compose_config(["stage=dmd", "data=synthetic", "stage.steps=4", "max_steps=3"])
    assert cfg.stage.steps == 4 and cfg.max_steps == 3


def test_old_per_stage_length_spelling_in_stage_all(tmp_path, capsys) -> None:
    assert main(["stage=all", "data=synthetic", "stage.steps.teacher=7", f"runs_root={tmp_path}",
                 "--cfg"]) == 0
    out = capsys.readouterr()
    assert "stage.steps.teacher= is now stage.max_steps.teacher=" in out.err
    assert yaml.safe_load(out.out)["stage"]["max_steps"]["teacher"] == 7


def test_data_configs_share_one_base() -> None:
    assert "_base" not in options("data")
    rec = OmegaConf.to_container(compose_config(["stage=tokenizer", "data=recorded"]).data)
    syn = OmegaConf.to_container(compose_config(["stage=tokenizer", "data=synthetic"]).data)
    assert rec["source"] == "recorded" and syn["source"] == "synthetic"
    assert {k: v for k, v in rec.items() if k not in ("source", "synthetic")} == \
        {k: v for k, v in syn.items() if k not in ("source", "synthetic")}
    assert syn["synthetic"]["episodes"] == 32 and rec["synthetic"] == {}
