"""Find the code blocks of a Markdown page that a reader would copy, and run them.

Every fenced block must name its language. ``bash`` and ``python`` blocks are executed by the docs
tests; every other language (``text``, ``json``, ``yaml``, ...) is shown, never run. A block that cannot
run in a test (it starts servers forever, needs Docker, ...) says so in an HTML comment right above it,
which the built site does not show::

    <!-- docs-test: skip: starts the MLflow UI and runs until Ctrl-C -->

Other markers: ``<!-- docs-test: slow -->`` above a block (run only with ``-m slow``), and once per page
``<!-- docs-test: workspace=NAME -->`` (the state the page's blocks start from; see ``doc_workspace``).
Markdown is parsed with markdown-it-py (CommonMark), so a fence inside a list item is found like any other.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from markdown_it import MarkdownIt

EXECUTED = ("bash", "python")
SHOWN = ("text", "json", "yaml", "toml", "dockerfile", "ini", "csv")
MARKER = re.compile(r"^<!--\s*docs-test:\s*(?P<body>.*?)\s*-->\s*$", re.S)
DEFAULT_WORKSPACE = "inputs"


class SnippetError(ValueError):
    """A page's code blocks or markers break the rules above; the message names file and line."""


@dataclass(frozen=True)
class Snippet:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None = None  # the reason it is not executed
    slow: bool = False

    @property
    def executed(self) -> bool:
        return self.lang in EXECUTED and self.skip is None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class Page:
    path: Path
    workspace: str
    snippets: tuple[Snippet, ...]


def _marker(token_content: str) -> str | None:
    m = MARKER.match(token_content.strip())
    return m.group("body") if m else None


def parse_page(path: Path, text: str | None = None) -> Page:
    """Every fenced block of ``path`` with its markers; raises SnippetError on a rule broken."""
    text = path.read_text() if text is None else text
    tokens = MarkdownIt("commonmark").parse(text)
    snippets: list[Snippet] = []
    workspace: str | None = None
    pending: list[tuple[int, str]] = []  # block markers waiting for their fence: (line, body)
    for tok in tokens:
        line = tok.map[0] + 1 if tok.map else 0
        body = _marker(tok.content) if tok.type == "html_block" else None
        if body is not None:
            if body.startswith("workspace="):
                if workspace is not None:
                    raise SnippetError(f"{path}:{line}: a second workspace marker")
                workspace = body.partition("=")[2].strip()
            elif body == "slow" or body.startswith("skip:"):
                pending.append((line, body))
            else:
                raise SnippetError(f"{path}:{line}: unknown docs-test marker {body!r}")
            continue
        if tok.type == "code_block":
            raise SnippetError(f"{path}:{line}: indented code block: use a fence with a language")
        if tok.type != "fence":
            if pending:
                raise SnippetError(f"{path}:{pending[0][0]}: marker not directly above a code block")
            continue
        lang = tok.info.strip().split(" ")[0] if tok.info.strip() else ""
        if lang not in EXECUTED + SHOWN:
            raise SnippetError(f"{path}:{line}: fence language {lang!r}: use one of {EXECUTED + SHOWN}")
        skip, slow = None, False
        for mline, body in pending:
            if body == "slow":
                slow = True
            else:
                skip = body.partition(":")[2].strip()
                if not skip:
                    raise SnippetError(f"{path}:{mline}: 'skip:' needs a reason")
        if (skip is not None or slow) and lang not in EXECUTED:
            raise SnippetError(f"{path}:{line}: markers only apply to {EXECUTED} blocks, not {lang!r}")
        pending = []
        snippets.append(Snippet(path, line, lang, tok.content, skip, slow))
    if pending:
        raise SnippetError(f"{path}:{pending[0][0]}: marker not directly above a code block")
    return Page(path, workspace or DEFAULT_WORKSPACE, tuple(snippets))


def run_snippet(snippet: Snippet, cwd: Path, env: dict[str, str], timeout: float,
                script_dir: Path) -> subprocess.CompletedProcess[str]:
    """Run one block as a user would paste it: bash with -e -o pipefail, or a fresh Python process."""
    if snippet.lang == "bash":
        cmd = ["bash", "-e", "-o", "pipefail", "-c", snippet.code]
    elif snippet.lang == "python":
        script = script_dir / f"{snippet.path.stem}_L{snippet.line}.py"
        script.write_text(snippet.code)
        cmd = [sys.executable, str(script)]
    else:
        raise SnippetError(f"{snippet.where}: {snippet.lang!r} blocks are not executed")
    return subprocess.run(cmd, cwd=cwd, env=env, text=True, capture_output=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def failure_report(snippet: Snippet, result: subprocess.CompletedProcess[str], tail: int = 6000) -> str:
    out = (result.stdout + result.stderr)[-tail:]
    return (f"{snippet.where}: {snippet.lang} block failed (exit {result.returncode})\n"
            f"--- block\n{snippet.code}--- output (last {tail} chars)\n{out}")


def write_console_script(bin_dir: Path, repo: Path, name: str = "recsys") -> Path:
    """``bin_dir/recsys`` running this checkout's entry point (pyproject.toml [project.scripts]).

    The venv's own script may come from another checkout's install (a shared development venv), so the
    tests run the entry point that this checkout declares, with the test's Python.
    """
    scripts = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts[name].partition(":")
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\nexec '{sys.executable}' -c 'import sys; sys.argv[0] = \"{name}\"; "
                    f"from {module} import {func}; sys.exit({func}())' \"$@\"\n")
    path.chmod(0o755)
    return path


def snippet_env(bin_dir: Path, repo: Path, base: dict[str, str] | None = None,
                extra_bin: Path | None = None) -> dict[str, str]:
    """The environment of a reader who ran ``source .venv/bin/activate`` in the repository root.

    ``extra_bin`` (this checkout's console script) comes before ``bin_dir`` (the venv's tools).
    """
    env = dict(os.environ if base is None else base)
    for name in ("RECSYS_DATA_ROOT", "RECSYS_PROFILE", "RECSYS_CONF_DIR", "MLFLOW_TRACKING_URI",
                 "PREFECT_API_URL", "PREFECT_HOME", "PYTEST_CURRENT_TEST"):
        env.pop(name, None)
    first = f"{extra_bin}{os.pathsep}" if extra_bin else ""
    env["PATH"] = f"{first}{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(repo)  # this checkout's code, also when the venv holds another copy
    env.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120", COLUMNS="120")
    return env
