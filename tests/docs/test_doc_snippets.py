"""Every bash and python block of README.md and docs/ runs, in page order, in a copy of a workspace.

A block that fails (a missing import, a renamed flag, a wrong path) fails its page's test with the file,
line, block and output. Blocks marked slow run only under ``-m slow`` (the page's ``[slow]`` variant runs
every block of the page, in order); blocks marked skip never run and must say why.
"""

from __future__ import annotations

from pathlib import Path

import doc_workspace
import pytest
from snippets import SnippetError, failure_report, parse_page, run_snippet

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted(p for p in (REPO / "docs").rglob("*.md") if "hooks" not in p.parts)]
TIMEOUT_S = 300


def _has_slow(page: Path) -> bool:
    try:
        return any(s.slow and s.executed for s in parse_page(page).snippets)
    except SnippetError:
        return False  # test_page_follows_the_rules reports it


def _params() -> list:
    params = []
    for page in PAGES:
        rel = str(page.relative_to(REPO))
        params.append(pytest.param(page, False, id=rel))
        if _has_slow(page):
            params.append(pytest.param(page, True, id=f"{rel}[slow]", marks=pytest.mark.slow))
    return params


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_page_follows_the_rules(page):
    parse_page(page)


@pytest.mark.parametrize(("page", "with_slow"), _params())
def test_page_blocks_run(page, with_slow, workspace, reader_env, tmp_path):
    parsed = parse_page(page)
    if page == doc_workspace.BUILDER_PAGE and not with_slow:
        workspace("trained")  # building it ran this page's blocks in order; a failure is reported there
        return
    blocks = [s for s in parsed.snippets if s.executed and (with_slow or not s.slow)]
    if not blocks:
        pytest.skip("no executed blocks")
    cwd = doc_workspace.copy_for_page(workspace(parsed.workspace), tmp_path / "page")
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for block in blocks:
        result = run_snippet(block, cwd, reader_env, TIMEOUT_S * (2 if block.slow else 1), scripts)
        if result.returncode:
            pytest.fail(failure_report(block, result), pytrace=False)
