"""Quality you can see, end to end on the shared tiny pipeline run: the pipeline summary on the top flow
run, the export monitoring artifacts, both HTML reports (rendered in headless Chromium when installed) and
their paths in the demo summary."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from browser import CHROMIUM, rendered_images, screenshot
from prefect.artifacts import Artifact
from rich.console import Console

pytestmark = pytest.mark.timeout(300)


def test_pipeline_summary_artifact_on_the_top_flow_run(pipeline_run):
    art = Artifact.get("pipeline-summary")
    assert art is not None and art.type == "markdown"
    training = pipeline_run["train"]["training"]
    assert training["run_id"] in art.data and "training report" in art.data and "export report" in art.data
    assert "## Slices (GRU4Rec)" in art.data and "| all |" in art.data


def test_export_monitoring_in_manifest_artifacts_and_series(pipeline_run, flow_root):
    score = pipeline_run["score"]
    manifest = json.loads((Path(score["path"]) / "_manifest.json").read_text())
    mon = manifest["monitoring"]
    assert mon["status"] in {"ok", "warn"} and 0 < mon["metrics"]["coverage"] <= 1
    assert (flow_root / "exports" / "monitoring" / f"run_date={pipeline_run['run_date']}.json").is_file()
    art = Artifact.get("export-monitoring")
    assert art is not None and "Export monitoring" in art.data and "coverage" in art.data
    link = Artifact.get("export-report")
    assert link is not None and Path(score["report_path"]).name in link.data


def test_demo_prints_both_report_paths(pipeline_run, ov):
    from flows.demo import print_summary

    console = Console(record=True, width=250)
    print_summary(console, {**pipeline_run, "wall_seconds": 1.0}, ov, n_users=1)
    text = console.export_text()
    assert pipeline_run["train"]["training"]["report_path"] in text
    assert pipeline_run["score"]["report_path"] in text


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian package chromium)")
@pytest.mark.parametrize("which", ["training", "export"])
def test_reports_render_with_their_images_in_chromium(pipeline_run, which, tmp_path):
    report = Path(pipeline_run["train"]["training"]["report_path"] if which == "training"
                  else pipeline_run["score"]["report_path"])
    images, decoded = rendered_images(report)
    assert images == decoded == (3 if which == "training" else 2)
    shot = screenshot(report, Path(os.environ.get("RECSYS_SCREENSHOT_DIR", tmp_path)) / f"{which}.png")
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000


def test_a_failing_export_fails_the_flow_unpublished_but_reported(pipeline_run, ov, flow_root):
    from datetime import date, timedelta

    from flows.score import score_flow
    from recsys.serving.monitoring import ExportMonitoringError

    day = date.fromisoformat(pipeline_run["run_date"]) + timedelta(days=1)
    strict = [*ov, "score.monitoring.limits={coverage: {fail_below: 1.01}}"]  # no export can pass this
    with pytest.raises(ExportMonitoringError, match="coverage"):
        score_flow(run_date=day, overrides=strict)
    assert not (flow_root / "exports" / "recs" / f"run_date={day}").exists()
    art = Artifact.get("export-monitoring")
    assert f"Export monitoring {day}: **FAIL**" in art.data
    assert (flow_root / "exports" / "monitoring" / f"report-{day}.html").is_file()
