"""The packages form layers: each imports only those below it (docs/design.md, "Layout").

Imports are read from the source (every ``import``/``from`` anywhere in a file, including the
lazy ones inside functions), so a cycle cannot hide behind an import placed in a function body.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# package -> the project packages it may import. Bottom first.
ALLOWED: dict[str, set[str]] = {
    "worldmodel": set(),
    "episodes": set(),
    "interactive": set(),
    "envs": {"worldmodel", "episodes", "interactive"},
    "record": {"episodes", "interactive", "envs"},
    "agents": {"worldmodel", "episodes", "envs", "train"},  # train: its plot helper
    "train": {"worldmodel", "episodes", "envs", "record"},
    "play": {"worldmodel", "episodes", "interactive", "envs", "record"},  # play.py, the app
}
PACKAGES = set(ALLOWED)


def project_imports(path: Path) -> set[str]:
    """The project's top-level packages that ``path`` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {name.split(".")[0] for name in names} & PACKAGES
    return found


def sources(package: str) -> list[Path]:
    return [ROOT / "play.py"] if package == "play" else sorted((ROOT / package).rglob("*.py"))


def test_every_package_imports_only_the_layers_below_it() -> None:
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in sources(package):
            for other in project_imports(path) - allowed - {package}:
                wrong.append(f"{path.relative_to(ROOT)} imports {other}")
    assert not wrong, "\n".join(wrong)


def test_the_layers_have_no_cycle() -> None:
    # The table itself must be a DAG (a wrong edit of ALLOWED could otherwise permit a cycle).
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        assert state.get(node) != 1, f"import cycle: {' -> '.join(trail + [node])}"
        if state.get(node) == 2:
            return
        state[node] = 1
        for nxt in ALLOWED[node]:
            visit(nxt, trail + [node])
        state[node] = 2

    for package in ALLOWED:
        visit(package, [])


def test_the_check_sees_a_lazy_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def render():\n    from record.session import SessionRecorder\n    import train.app\n")
    assert project_imports(bad) == {"record", "train"}


def test_every_package_is_in_the_table() -> None:
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "docs", "benchmarks"}
    assert on_disk <= PACKAGES, f"packages without a layer: {sorted(on_disk - PACKAGES)}"
