"""`python -m train --help [stage=<stage>]`: every option with its default and what it does.

The dataclasses are the schema (their defaults are what a run gets unless the stage yaml or the
command line says otherwise), and the comment on a field's line is its documentation, so the help
is read from them and cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

_FIELD = re.compile(r"^\s+(\w+)\s*:\s*[^=#]+?(?:=\s*(?P<default>[^#]+?))?\s*(?:#\s*(?P<doc>.*))?$")
_MORE = re.compile(r"^\s+#(?P<gap>\s*)(?P<doc>.*)$")


def field_docs(cls: type) -> dict[str, str]:
    """{field: its comment}, read from the source of ``cls`` and its dataclass bases (a base's
    field documented there keeps its words). A ``#`` line indented to the comment column goes on
    the field above; a block of ``#`` lines above a field without a comment of its own is its doc."""
    docs: dict[str, str] = {}
    for klass in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        docs.update({k: v for k, v in _own_docs(klass).items() if v or k not in docs})
    return docs


def _own_docs(cls: type) -> dict[str, str]:
    docs: dict[str, str] = {}
    last, block = None, []
    names = {f.name for f in dataclasses.fields(cls)}
    for line in inspect.getsource(cls).splitlines()[1:]:
        m = _FIELD.match(line)
        if m and m.group(1) in names:
            last = m.group(1)
            docs[last] = (m.group("doc") or "").strip() or " ".join(block)
            block = []
            continue
        more = _MORE.match(line)
        if more and len(more.group("gap")) >= 4 and last is not None and docs[last]:
            docs[last] += " " + more.group("doc").strip()   # continuation, in the comment column
        elif more:
            block.append(more.group("doc").strip())        # leads the next field
            last = None
        else:
            last, block = None, []
    return docs


def describe(cls: type, prefix: str = "") -> str:
    """One line per field: ``prefix+name=default  comment``."""
    docs = field_docs(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        if isinstance(default, tuple):
            default = list(default)
        rows.append((f"{prefix}{f.name}={default}", docs.get(f.name, "")))
    width = min(44, max(len(r[0]) for r in rows) + 2)
    return "\n".join(f"  {k:<{width}}{doc}".rstrip() for k, doc in rows)
