"""The documentation site builds with --strict (broken links, anchors, drift in generated pages fail)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README_MAX_LINES = 250


def test_mkdocs_build_is_strict_and_clean(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)]
    result = subprocess.run(cmd, cwd=REPO, env=env, text=True, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    reference = (tmp_path / "configuration" / "index.html").read_text()
    assert "<code>n_sample</code>" in reference and "config-reference" not in reference
    api = (tmp_path / "api" / "index.html").read_text()
    assert 'id="recsys.serving.score.score_users"' in api


def test_readme_is_short_commands_first_and_links_resolve():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    assert first_block.startswith("make demo") and "make test" in first_block
    assert text.index("```bash\nmake demo") < text.index("\n## ")  # before any section
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")):
            assert (REPO / target).exists(), f"README links to missing {target}"
    pages = {p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md") if p.name != "index.md"}
    assert pages <= set(re.findall(r"\]\((docs/[^)#]+)", text)), "every docs page is linked from the README"
