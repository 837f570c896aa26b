"""MkDocs hook: the configuration reference, generated at build time so that it cannot drift.

The page ``configuration.md`` holds the marker ``<!-- config-reference -->``; every build replaces it
with one table per section: each key of the pydantic model in ``recsys/config.py`` (type, constraints,
default) beside the value shipped in ``conf/<section>.yaml`` and that line's comment, then the profiles
of ``conf/profiles/``. A key that the YAML lacks, a YAML key without a comment, or a YAML key the model
does not know fails the build.
"""

from __future__ import annotations

import re
import sys
import types
import typing
from datetime import datetime
from pathlib import Path
from typing import Any

import annotated_types
import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `mkdocs build` from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from pydantic import BaseModel  # noqa: E402
from pydantic_core import to_jsonable_python  # noqa: E402

from recsys.config import PROFILES_DIR, Config  # noqa: E402

MARKER = "<!-- config-reference -->"
KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.]*|\"[^\"]+\"):(?P<rest>.*)$")


def _split_comment(rest: str) -> tuple[str, str | None]:
    """``' 20   # top-K'`` -> ('20', 'top-K'); a '#' inside quotes is part of the value."""
    quote = None
    for i, ch in enumerate(rest):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or rest[i - 1] in " \t"):
            return rest[:i].strip(), rest[i + 1:].strip()
    return rest.strip(), None


def yaml_comments(text: str) -> tuple[list[str], dict[str, str | None], dict[str, list[str]]]:
    """The file's header comment, each dotted key's end-of-line comment, and comment lines above a key."""
    header: list[str] = []
    comments: dict[str, str | None] = {}
    notes: dict[str, list[str]] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    above: list[str] = []
    seen_key = False
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            (above if seen_key else header).append(stripped.lstrip("#").strip())
            continue
        m = KEY_LINE.match(raw)
        if not m:
            continue
        seen_key = True
        indent, key = len(m["indent"]), m["key"].strip('"')
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [key])
        value, comment = _split_comment(m["rest"])
        comments[dotted] = comment
        if above:
            notes[dotted], above = above, []
        if not value:
            stack.append((indent, key))
    return header, comments, notes


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " &#124; ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or `null`" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"mapping of {_type_name(args[1])}" if args else "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "{" + ", ".join(annotation.model_fields) + "}"
    simple = {bool: "bool", int: "int", float: "float", str: "string", Path: "path", datetime: "timestamp"}
    return simple.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _constraints(metadata: list[Any]) -> str:
    signs = {annotated_types.Ge: ("≥", "ge"), annotated_types.Gt: (">", "gt"),
             annotated_types.Le: ("≤", "le"), annotated_types.Lt: ("<", "lt"),
             annotated_types.MinLen: ("length ≥", "min_length")}
    parts = []
    for item in metadata:
        for cls, (sign, attr) in signs.items():
            if isinstance(item, cls):
                parts.append(f"{sign} {getattr(item, attr)}")
    return ", ".join(parts)


def _plain(value: Any) -> Any:
    """YAML-safe data for any default: models (also inside mappings and lists) show only what they set."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_defaults=True)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    return to_jsonable_python(value)  # paths, timestamps, enums


def _literal(value: Any) -> str:
    value = _plain(value)
    if isinstance(value, str) and value:
        return f"`{value}`"
    if value is None:
        return "`null`"
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False)
    text = text.strip().removesuffix("...").strip()
    return f"`{text}`"


def _cell(text: str | None) -> str:
    return (text or "").replace("|", "&#124;")


def _fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, FieldInfo) of a section, nested sections flattened (``columns.user_id``)."""
    found = []
    for name, info in model.model_fields.items():
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            found.append((prefix + name, info))
            found.extend(_fields(sub, f"{prefix}{name}."))
        else:
            found.append((prefix + name, info))
    return found


def _lookup(tree: Any, dotted: str) -> tuple[bool, Any]:
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _section(section: str, conf_dir: Path, problems: list[str]) -> list[str]:
    file = conf_dir / f"{section}.yaml"
    model = type(getattr(Config(), section))
    text = file.read_text() if file.is_file() else ""
    if not text:
        problems.append(f"{file}: missing: every section ships a commented YAML file")
    tree = yaml.safe_load(text) or {}
    header, comments, notes = yaml_comments(text)
    out = [f"## `{section}`", "", f"File `conf/{section}.yaml`. " + " ".join(header), ""]
    out += ["| key | type | default | shipped | what it does |", "|---|---|---|---|---|"]
    fields = _fields(model)
    known = {key for key, _ in fields}
    extra_tables: list[str] = []
    for key, info in fields:
        nested = isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)
        present, shipped = _lookup(tree, key)
        if not present:
            problems.append(f"conf/{section}.yaml: no key {key} (the model has it: ship it with a comment)")
        elif not comments.get(key) and not notes.get(key):
            problems.append(f"conf/{section}.yaml: key {key} has no comment")
        kind = "mapping" if nested else _type_name(info.annotation)
        limits = _constraints(info.metadata)
        default = "" if nested else _literal(info.default)
        value = "" if nested or not present else _literal(shipped)
        what = _cell(" ".join(notes.get(key, [])[:1] + [comments.get(key) or ""]).strip())
        if isinstance(shipped, dict) and not nested:  # a free mapping (tune.space): one row per entry
            value = f"{len(shipped)} entries, below"
            extra_tables += _mapping_table(section, key, shipped, comments, notes.get(key, []), problems)
        kind += f" ({limits})" if limits else ""
        out.append(f"| `{key}` | {kind} | {default} | {value} | {what} |")
    free = [k for k, i in fields if typing.get_origin(i.annotation) is dict]  # keys of a free mapping
    for key in comments:
        if key not in known and not any(key.startswith(f"{k}.") for k in free):
            problems.append(f"conf/{section}.yaml: key {key} is not in recsys.config ({model.__name__})")
    return out + [""] + extra_tables


def _mapping_table(section: str, key: str, shipped: dict[str, Any], comments: dict[str, str | None],
                   notes: list[str], problems: list[str]) -> list[str]:
    out = [f"`{section}.{key}`: " + " ".join(notes), "", "| entry | value | what it does |", "|---|---|---|"]
    for entry, value in shipped.items():
        comment = comments.get(f"{key}.{entry}")
        if not comment:
            problems.append(f"conf/{section}.yaml: key {key}.{entry} has no comment")
        out.append(f"| `{entry}` | {_literal(value)} | {_cell(comment)} |")
    return out + [""]


def _profiles(conf_dir: Path, problems: list[str]) -> list[str]:
    files = sorted((conf_dir / PROFILES_DIR).glob("*.yaml"))
    out = ["## Profiles", "",
           "Laid over the section files by `recsys --profile NAME ...` or `RECSYS_PROFILE=NAME`; "
           "any `--set` still wins.", ""]
    for file in files:
        text = file.read_text()
        header, comments, _ = yaml_comments(text)
        tree = yaml.safe_load(text) or {}
        out += [f"### `{file.stem}`", "", f"File `conf/{PROFILES_DIR}/{file.name}`. " + " ".join(header), "",
                "| key | value | why |", "|---|---|---|"]
        for section, values in tree.items():
            for key, value in (values or {}).items():
                dotted = f"{section}.{key}"
                if not comments.get(dotted):
                    problems.append(f"{file}: key {dotted} has no comment")
                out.append(f"| `{dotted}` | {_literal(value)} | {_cell(comments.get(dotted))} |")
        out.append("")
    return out


def render_reference(conf_dir: Path) -> tuple[str, list[str]]:
    """The reference as Markdown, and every drift found between the models and the YAML files."""
    problems: list[str] = []
    lines: list[str] = []
    for section in Config.model_fields:
        lines += _section(section, conf_dir, problems)
    lines += _profiles(conf_dir, problems)
    for file in sorted(conf_dir.glob("*.yaml")):
        if file.stem not in Config.model_fields:
            problems.append(f"{file}: not a config section ({', '.join(Config.model_fields)})")
    return "\n".join(lines) + "\n", problems


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER not in markdown:
        return markdown
    from mkdocs.exceptions import PluginError

    text, problems = render_reference(REPO / "conf")
    if problems:
        raise PluginError("configuration reference: " + "; ".join(problems))
    return markdown.replace(MARKER, text)
