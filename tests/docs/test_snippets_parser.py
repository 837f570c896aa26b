"""The block finder and runner that the documentation tests rely on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from snippets import Snippet, SnippetError, parse_page, run_snippet, snippet_env, write_console_script

PAGE = Path("page.md")


def _parse(text: str):
    return parse_page(PAGE, text)


def test_finds_blocks_with_language_line_and_markers():
    page = _parse("""# Title

<!-- docs-test: workspace=trained -->

```bash
recsys train
```

- a list item

  ```python
  print(1)
  ```

<!-- docs-test: skip: runs until Ctrl-C -->
```bash
recsys ui
```

<!-- docs-test: slow -->
```bash
recsys pipeline
```

```text
output, never run
```
""")
    assert page.workspace == "trained"
    assert [(s.lang, s.line, s.executed, s.slow) for s in page.snippets] == [
        ("bash", 5, True, False), ("python", 11, True, False), ("bash", 16, False, False),
        ("bash", 21, True, True), ("text", 25, False, False)]
    assert page.snippets[0].code == "recsys train\n"
    assert page.snippets[1].code == "print(1)\n"  # list indentation removed
    assert page.snippets[2].skip == "runs until Ctrl-C"


def test_default_workspace_is_inputs():
    assert _parse("```bash\ntrue\n```\n").workspace == "inputs"


@pytest.mark.parametrize(("text", "message"), [
    ("```\nrecsys train\n```\n", "fence language ''"),
    ("```sh\nrecsys train\n```\n", "fence language 'sh'"),
    ("Text:\n\n    indented code\n", "indented code block"),
    ("<!-- docs-test: skip -->\n```bash\nx\n```\n", "unknown docs-test marker"),
    ("<!-- docs-test: skip: -->\n```bash\nx\n```\n", "needs a reason"),
    ("<!-- docs-test: slow -->\n\nSome text.\n\n```bash\nx\n```\n", "not directly above"),
    ("<!-- docs-test: slow -->\n", "not directly above"),
    ("<!-- docs-test: slow -->\n```text\nx\n```\n", "markers only apply"),
    ("<!-- docs-test: fast -->\n```bash\nx\n```\n", "unknown docs-test marker"),
    ("<!-- docs-test: workspace=a -->\n<!-- docs-test: workspace=b -->\n", "second workspace"),
])
def test_rule_breaks_name_file_and_line(text, message):
    with pytest.raises(SnippetError, match=message) as err:
        _parse(text)
    assert str(err.value).startswith("page.md:")


def test_ordinary_html_comments_are_not_markers():
    page = _parse("<!-- a note for editors -->\n\n```bash\ntrue\n```\n")
    assert page.snippets[0].executed


def _run(lang: str, code: str, tmp_path: Path):
    env = snippet_env(Path(sys.executable).parent, Path.cwd(), base={"PATH": os.environ["PATH"]})
    return run_snippet(Snippet(PAGE, 1, lang, code), tmp_path, env, 60, tmp_path)


def test_bash_blocks_stop_at_the_first_failure_and_in_pipelines(tmp_path):
    assert _run("bash", "echo ok > out.txt\n", tmp_path).returncode == 0
    assert (tmp_path / "out.txt").read_text() == "ok\n"  # runs in the workspace
    assert _run("bash", "false\necho never > never.txt\n", tmp_path).returncode != 0
    assert not (tmp_path / "never.txt").exists()
    assert _run("bash", "false | cat\n", tmp_path).returncode != 0


def test_python_blocks_run_in_a_fresh_interpreter(tmp_path):
    code = "from pathlib import Path\nPath('made.txt').write_text('x')\n"
    assert _run("python", code, tmp_path).returncode == 0
    assert (tmp_path / "made.txt").is_file()
    result = _run("python", "print(date(2026, 3, 10))\n", tmp_path)  # a missing import fails
    assert result.returncode != 0 and "NameError" in result.stderr


def test_reader_env_drops_the_test_runs_settings():
    env = snippet_env(Path("/venv/bin"), Path("/repo"), base={
        "PATH": "/usr/bin", "RECSYS_DATA_ROOT": "/elsewhere", "MLFLOW_TRACKING_URI": "http://x"})
    assert env["PATH"] == f"/venv/bin{os.pathsep}/usr/bin"
    assert "RECSYS_DATA_ROOT" not in env and "MLFLOW_TRACKING_URI" not in env
    assert env["PYTHONPATH"] == "/repo"


def test_console_script_runs_this_checkouts_entry_point(tmp_path):
    script = write_console_script(tmp_path, Path(__file__).resolve().parents[2])
    result = subprocess.run([str(script), "--help"], text=True, capture_output=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert result.returncode == 0, result.stderr
    assert "pipeline" in result.stdout and "Usage: recsys" in result.stdout
