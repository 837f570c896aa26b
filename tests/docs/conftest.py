"""Fixtures of the documentation tests: the reader's environment and the workspaces pages start from."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import doc_workspace
import pytest
from snippets import snippet_env, write_console_script

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def reader_bin(tmp_path_factory) -> Path:
    """This checkout's ``recsys`` console script (the venv's python, ruff, hadolint... come after it)."""
    bin_dir = tmp_path_factory.mktemp("bin")
    write_console_script(bin_dir, REPO)
    return bin_dir


@pytest.fixture(scope="session")
def reader_env(reader_bin) -> dict[str, str]:
    return snippet_env(Path(sys.executable).parent, REPO, extra_bin=reader_bin)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory, reader_env) -> Callable[[str], Path]:
    """``workspace(name)``: the path of that workspace's repository root, built once per session.

    A workspace that failed to build fails every page that needs it with the same report.
    """
    built: dict[str, Path | Exception] = {}

    def get(name: str) -> Path:
        if name not in built:
            try:
                inputs = None if name == "inputs" else get("inputs")
                built[name] = doc_workspace.build(tmp_path_factory.mktemp(f"ws-{name}"), name, reader_env,
                                                  inputs)
            except Exception as exc:
                built[name] = exc
        if isinstance(built[name], Exception):
            pytest.fail(f"workspace {name!r} could not be built:\n{built[name]}", pytrace=False)
        return built[name]

    return get
