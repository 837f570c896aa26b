"""The generated configuration reference covers every key and reports drift between code and conf/."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from recsys.config import Config

REPO = Path(__file__).resolve().parents[2]


def _hook(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "docs" / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _hook("config_reference")
api = _hook("api_reference")


def test_every_model_key_is_in_the_reference_and_conf_has_no_drift():
    text, problems = ref.render_reference(REPO / "conf")
    assert problems == []
    for section, field in Config.model_fields.items():
        assert f"## `{section}`" in text
        for key in type(field.default).model_fields:
            assert f"| `{key}` |" in text, f"{section}.{key}"
    assert "| `columns.user_id` |" in text and "### `movielens`" in text


@pytest.mark.parametrize(("edit", "problem"), [
    (lambda t: t.replace("# maximum training epochs", ""), "key epochs has no comment"),
    (lambda t: t.replace("patience: 3", "# patience removed"), "no key patience"),
    (lambda t: t + "warmup: 3               # not a real key\n", "key warmup is not in recsys.config"),
])
def test_drift_is_reported(tmp_path, edit, problem):
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    train = conf / "train.yaml"
    train.write_text(edit(train.read_text()))
    _, problems = ref.render_reference(conf)
    assert any(problem in p for p in problems), problems


def test_yaml_comments_track_nesting_and_quotes():
    header, comments, notes = ref.yaml_comments(
        "# Header line.\nouter:        # the outer\n  inner: 'a # b'   # why\n# above\nnext: 1 # n\n")
    assert header == ["Header line."]
    assert comments == {"outer": "the outer", "outer.inner": "why", "next": "n"}
    assert notes == {"next": ["above"]}


def test_api_reference_lists_every_export_where_it_is_defined():
    text, problems = api.render_api(REPO)
    assert problems == []
    import recsys.serving
    for name in recsys.serving.__all__:
        assert f".{name}\n" in text
    assert "::: recsys.serving.export.read_recs" in text


def test_defaults_with_nested_models_are_shown_as_what_they_set():
    from pydantic import BaseModel

    class Bound(BaseModel):
        low: float | None = None
        high: float | None = None

    shown = ref._literal({"a": Bound(low=0.1), "b": [Bound(high=2.0)]})
    assert shown == "`{a: {low: 0.1}, b: [{high: 2.0}]}`"
    assert ref._literal(Path("x/y")) == "`x/y`"
    text, _ = ref.render_reference(REPO / "conf")
    assert "| `monitoring.limits` |" in text and "| `coverage` | `{warn_below: 0.05}` |" in text
