"""Every config key with its type, default and meaning, read from the dataclasses'
comments (dcgan/config/sections.py): ``python -m dcgan.train --help`` and launch's help.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import re
import textwrap
import tokenize
import typing
from typing import Any

import yaml

from dcgan.config.sections import Config, plain, type_name

# --------------------------------------------------------------------------- the keys, for --help


class KeyHelp(typing.NamedTuple):
    """One setting as ``--help`` lists it."""

    key: str  # dotted, e.g. "train.batch_size"
    section: str  # e.g. "data.augment"
    type: str  # as written in YAML: int, float, bool, str, [float, float], list[str], auto|on|off, float|auto
    default: str  # the default as YAML (flow style)
    meaning: str  # the comment beside the field ("": none, which tests/e2e/test_cli.py rejects)


def describe_keys(cls: type | None = None, prefix: str = "") -> list[KeyHelp]:
    """Every key of the run config (of ``cls``, under ``prefix``), in the YAML file's
    order, a section's own keys before its subsections'. The meanings are the comments
    beside the fields in the source, so the help cannot drift from the code."""
    cls = cls or Config
    hints, comments = typing.get_type_hints(cls), field_comments(cls)
    defaults = plain(dataclasses.asdict(cls()))
    keys, subsections = [], []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            subsections.append(f.name)
            continue
        keys.append(
            KeyHelp(prefix + f.name, prefix.rstrip("."), type_name(hints[f.name]), _yaml_flow(defaults[f.name]),
                    comments.get(f.name, ""))
        )  # fmt: skip
    for name in subsections:
        keys += describe_keys(hints[name], f"{prefix}{name}.")
    return keys


def describe_sections(cls: type | None = None, prefix: str = "") -> dict[str, str]:
    """Every section ("data", "data.augment", ...) and its heading: the comment beside the
    field that holds it, else the first line of its class's docstring."""
    cls = cls or Config
    hints, comments = typing.get_type_hints(cls), field_comments(cls)
    found = {}
    for f in dataclasses.fields(cls):
        sub = hints[f.name]
        if dataclasses.is_dataclass(sub):
            doc = (sub.__doc__ or "").strip()
            doc = "" if doc.startswith(sub.__name__ + "(") else doc  # dataclass's generated signature
            found[prefix + f.name] = comments.get(f.name) or " ".join(doc.split("\n\n")[0].split())
            found.update(describe_sections(sub, f"{prefix}{f.name}."))
    return found


def format_keys(keys: list[KeyHelp], sections: dict[str, str], width: int = 100) -> str:
    """The keys as a reference, one block per section: ``  key  type  default  meaning``
    (the meaning wrapped under its column; below the row when the row is long)."""
    blocks = []
    for section, heading in sections.items():
        rows = [k for k in keys if k.section == section]
        if not rows:
            continue
        kw = max(len(k.key) for k in rows)
        tw = max((len(k.type) for k in rows if len(k.type) <= 16), default=0)
        dw = max((len(k.default) for k in rows if len(k.default) <= 12), default=0)
        column = 2 + kw + 2 + tw + 2 + dw + 2
        lines = [f"{section}.  {heading}"]
        for k in rows:
            fits = len(k.type) <= tw and len(k.default) <= dw and column <= width - 30
            head = f"  {k.key:<{kw}}  {k.type:<{tw}}  {k.default:<{dw}}"
            if not fits:
                head = f"  {k.key}  {k.type}  {k.default}"
            indent = column if fits else min(column, 8)
            wrapped = textwrap.wrap(
                k.meaning or "(no meaning: document it in dcgan/config/sections.py)", width - indent
            )
            if fits:
                lines.append(f"{head}  {wrapped[0]}")
                wrapped = wrapped[1:]
            else:
                lines.append(head)
            lines += [" " * indent + text for text in wrapped]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def keys_help(width: int = 100) -> str:
    """Every key of the run config, by section: the reference ``dcgan.train --help`` ends with."""
    return format_keys(describe_keys(), describe_sections(), width)


_PRAGMA = re.compile(r"#\s*(fmt|noqa|type|pragma)\b")


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """The meaning of each field of dataclass ``cls``, from its source: the comment lines
    just above the field, then the comment on its own line(s), as one line of text
    ({} where the source is not installed: the help then lacks meanings, nothing else)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comments = {
        tok.start[0]: tok.string
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT and not _PRAGMA.match(tok.string)
    }
    (node,) = ast.parse(source).body
    found = {}
    for item in node.body:
        if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
            continue
        above, n = [], item.lineno - 1
        while n >= 1 and lines[n - 1].lstrip().startswith("#"):
            above.insert(0, comments.get(n, ""))
            n -= 1
        beside = [comments[i] for i in range(item.lineno, item.end_lineno + 1) if i in comments]
        text = " ".join(c.lstrip("#").strip() for c in above + beside)
        found[item.target.id] = " ".join(text.split())
    return found


def _yaml_flow(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip()
    return text.removesuffix("...").strip()  # a lone scalar ends the document with "..."
