"""Every command in README.md and docs/ names a module that exists and options it accepts, and
every relative link points at a file that exists.

Commands are not run (most train for minutes or need a recorded dataset); what rots is their
spelling: a module moves, a flag or a config key is renamed. So each one is checked against the
real parser: `python -m train` overrides are composed by hydra (unknown keys fail), evaluation's
keys against its config, and every `--flag` of an argparse CLI must appear in that CLI's --help.
Shell variables defined in the same code block (`C="data=$D model=fine"`) are expanded first.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from dataclasses import fields
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "episodes" / "FORMAT.md"]
SUBCOMMANDS = {"record": 1, "agents": 1}  # CLIs whose first word picks a subcommand
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
ASSIGN = re.compile(r"^([A-Z_][A-Z0-9_]*)=(.*)$")


def code_lines(text: str) -> list[tuple[str, dict[str, str]]]:
    """(command, shell variables defined above it in its block) for every line of a fenced shell
    code block (continuations joined) and every inline code span that starts with python/torchrun."""
    out: list[tuple[str, dict[str, str]]] = []
    for lang, block in re.findall(r"```([a-z]*)\n(.*?)```", text, flags=re.S):
        if lang not in ("", "bash", "sh", "shell", "console"):
            continue
        env: dict[str, str] = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s#\s.*$|\s#$", "", line).strip().rstrip("&").strip()
            pieces = [p.strip() for p in line.split(";")]
            if all(ASSIGN.match(p) for p in pieces if p):
                for piece in filter(None, pieces):  # R=runs/x; C="data=$D model=fine"
                    name, value = ASSIGN.match(piece).groups()
                    env[name] = expand(value.strip('"'), env)  # as the shell does, at definition
            elif line:
                out.append((line, dict(env)))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`((?:python|torchrun)\s[^`]+)`", prose):
        out.append((span, {}))
    return out


def expand(line: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Z_][A-Z0-9_]*)\}?", lambda m: env.get(m.group(1), "X"), line)


def commands() -> list[tuple[str, str]]:
    """(where, command) for every python/torchrun command in the docs, variables expanded."""
    found = []
    for doc in DOCS:
        for line, env in code_lines(doc.read_text()):
            words = line.split()
            while words and ASSIGN.match(words[0]):  # OMP_NUM_THREADS=1 python ...
                words = words[1:]
            if words and words[0] in ("python", "torchrun"):
                found.append((doc.relative_to(ROOT).as_posix(), expand(" ".join(words), env)))
    return found


def target(words: list[str]) -> tuple[str, list[str]]:
    """(module or script, its arguments) of a python/torchrun command line."""
    if "-m" in words:
        i = words.index("-m")
        return words[i + 1], words[i + 2:]
    script = next(w for w in words[1:] if w.endswith(".py"))
    return script, words[words.index(script) + 1:]


@cache
def help_text(module: str, sub: tuple[str, ...]) -> str:
    cmd = [sys.executable, str(ROOT / module)] if module.endswith(".py") else [sys.executable, "-m", module]
    run = subprocess.run([*cmd, *sub, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={"PYGAME_HIDE_SUPPORT_PROMPT": "1", "SDL_VIDEODRIVER": "dummy",
                              "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, f"{module} {' '.join(sub)} --help failed:\n{run.stderr[-2000:]}"
    return run.stdout


def check_train(args: list[str]) -> None:
    from train.app import compose_config
    from train.pipeline import split_stage_options

    if "--help" in args or any("<" in a for a in args):
        return  # the synopsis form (`--help stage=<stage>`)
    overrides = [a for a in args if "=" in a and not a.startswith("-") and "..." not in a]
    common, _ = split_stage_options(overrides)
    common = [a for a in common if not a.startswith("stage.steps.")] if "stage=all" in common else common
    if not any(a.startswith("stage=") for a in common):
        common.append("stage=ar")
    compose_config(common)  # raises naming the key hydra does not know


def check_eval(args: list[str]) -> None:
    from train.eval.run import EvalConfig

    known = {f.name for f in fields(EvalConfig)} | {"checkpoint"}
    keys = {a.split("=", 1)[0] for a in args if "=" in a}
    assert keys <= known, f"unknown train.eval keys {sorted(keys - known)}"


def check_argparse(module: str, args: list[str], line: str) -> None:
    sub = tuple(a for a in args[:SUBCOMMANDS.get(module, 0)] if not a.startswith("-"))
    text = help_text(module, sub)
    missing = sorted(set(FLAG.findall(line.split(module, 1)[1])) - set(FLAG.findall(text)) - {"--help"})
    assert not missing, f"{module} {' '.join(sub)} has no {missing}"


@pytest.mark.parametrize("where,line", commands(), ids=lambda v: v[:70])
def test_documented_command_is_spelled_right(where: str, line: str) -> None:
    words = shlex.split(line.replace("[", " ").replace("]", " ").replace("|", " "), posix=True) \
        if line.count('"') % 2 == 0 else line.split()
    if line.strip() in ("torchrun", "python -m pytest") or line.startswith("torchrun forwards"):
        return
    module, args = target(words)
    if module == "pytest":
        return
    if module.endswith(".py"):
        assert (ROOT / module).is_file(), f"{where}: no script {module}"
    else:
        assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
    if module == "train":
        check_train(args)
    elif module in ("train.eval", "train.evaluate"):
        check_eval(args)
    else:
        check_argparse(module, args, line)


def test_the_docs_have_commands_to_check() -> None:
    modules = {target(line.split())[0] for _, line in commands() if "-m" in line.split() or ".py" in line}
    assert {"train", "record", "agents", "play.py", "train.eval", "envs.strip"} <= modules


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_exist(doc: Path) -> None:
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    broken = []
    for link in re.findall(r"\]\(([^)\s]+)\)", text):
        path = link.split("#", 1)[0]
        if path and not re.match(r"[a-z]+:", path) and not (doc.parent / path).exists():
            broken.append(link)
    assert not broken, f"{doc.name}: links to missing files {broken}"


def test_a_misspelt_command_fails() -> None:
    # The checks must be able to fail: an old module path, a bad flag, an unknown config key.
    assert importlib.util.find_spec("envs.play") is None
    with pytest.raises(AssertionError, match="--nope"):
        check_argparse("record", ["collect", "--nope"], "python -m record collect --nope")
    with pytest.raises(Exception, match="stage.nope"):
        check_train(["stage=ar", "data=x", "stage.nope=1"])
    with pytest.raises(AssertionError, match="nope"):
        check_eval(["checkpoint=a", "nope=1"])
