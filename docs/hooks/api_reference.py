"""MkDocs hook: the API reference lists exactly what each stage package exports.

The page ``api.md`` holds the marker ``<!-- api-reference -->``; every build replaces it with one
section per stage package and one mkdocstrings block per name in its ``__all__``, documented where it is
defined. The packages export lazily (``recsys.lazy_exports``), so the name -> module map is read from
each ``__init__.py`` with ``ast`` instead of importing torch or mlflow at build time.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
MARKER = "<!-- api-reference -->"
PACKAGES = ("recsys.data", "recsys.model", "recsys.training", "recsys.tracking", "recsys.serving")


def exports(package: str, repo: Path = REPO) -> tuple[str, list[tuple[str, str]], list[str]]:
    """(package docstring, [(public name, defining module)], problems) from the package's __init__.py."""
    path = repo / Path(*package.split(".")) / "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    names: list[str] = []
    where: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            names = list(ast.literal_eval(node.value))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy_exports":
            where = ast.literal_eval(node.args[1])
    problems = [f"{path}: {name} is in __all__ but not in the lazy_exports map" for name in names
                if name not in where]
    found = [(n, f"{package}.{where[n]}") for n in names if n in where]
    return ast.get_docstring(tree) or "", found, problems


def render_api(repo: Path = REPO) -> tuple[str, list[str]]:
    lines: list[str] = []
    problems: list[str] = []
    for package in PACKAGES:
        doc, names, found = exports(package, repo)
        problems += found
        lines += [f"## `{package}`", "", doc.split("\n\n")[0], ""]
        for name, module in names:
            lines += [f"::: {module}.{name}", "    options:", "      heading_level: 3",
                      f'      toc_label: "{name}"', ""]
    return "\n".join(lines) + "\n", problems


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER not in markdown:
        return markdown
    from mkdocs.exceptions import PluginError

    text, problems = render_api()
    if problems:
        raise PluginError("API reference: " + "; ".join(problems))
    return markdown.replace(MARKER, text)
