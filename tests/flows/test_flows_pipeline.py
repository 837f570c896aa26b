"""The pipeline flow end to end, its artifacts, idempotent re-runs and Dask-sharded scoring."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from flow_constants import RUN_DATE
from prefect.artifacts import Artifact
from rich.console import Console

pytestmark = pytest.mark.timeout(300)


def read_export(summary_or_manifest: dict) -> pl.DataFrame:
    return pl.read_parquet(Path(summary_or_manifest["path"]) / "part-0.parquet")


def artifact(key: str):
    found = Artifact.get(key)
    assert found is not None, f"no artifact {key!r}"
    return found


def test_pipeline_publishes_an_export(pipeline_run, flow_root):
    score = pipeline_run["score"]
    export = Path(score["path"])
    assert export == flow_root / "exports" / "recs" / f"run_date={RUN_DATE}"
    assert (export / "_manifest.json").is_file()
    recs = read_export(score)
    assert recs.height == score["rows"] > 0
    assert recs["rank"].min() == 1
    assert recs["model_version"].unique().to_list() == [pipeline_run["train"]["training"]["model_version"]]
    assert Path(pipeline_run["catalogue"]).is_file()
    assert pipeline_run["train"]["decision"]["promoted"] is True  # first model: beats most-popular


def test_ingest_stats_artifact(pipeline_run):
    ingest = pipeline_run["ingest"]
    art = artifact("ingest-stats")
    assert art.type == "table"
    rows = {r["measure"]: r["value"] for r in json.loads(art.data)}
    assert rows["rows in"] == ingest["rows_in"]
    assert rows["events written"] == ingest["events_written"]
    assert rows["quarantined (total)"] == sum(ingest["quarantined"].values()) > 0  # noise rows
    for reason, n in ingest["quarantined"].items():
        assert rows[f"quarantined: {reason}"] == n


def test_training_artifacts(pipeline_run):
    train = pipeline_run["train"]
    run_id = train["training"]["run_id"]
    report = artifact("training-report")
    assert report.type == "markdown"
    assert run_id in report.data
    assert "| gru4rec |" in report.data and "| most_popular |" in report.data
    assert "promoted to @champion" in report.data
    link = artifact("mlflow-run")
    assert train["run_url"] in link.data and run_id in link.data  # Prefect stores links as markdown
    decision = artifact("promotion-decision")
    assert "promoted to @champion" in decision.data and "most popular" in decision.data


def test_export_summary_artifact(pipeline_run):
    score = pipeline_run["score"]
    rows = {r["field"]: r["value"] for r in json.loads(artifact("export-summary").data)}
    assert rows["rows"] == str(score["rows"])
    assert rows["path"] == score["path"]
    assert rows["model.version"] == pipeline_run["train"]["training"]["model_version"]


def test_library_logs_reach_the_flow_run_logger(pipeline_run):
    import logging

    handlers = logging.getLogger("recsys").handlers
    assert any(type(h).__name__ == "APILogHandler" for h in handlers)


def test_reruns_are_idempotent(pipeline_run, ov):
    from flows.ingest import ingest_flow
    from flows.score import score_flow
    from flows.train import train_flow

    before = read_export(pipeline_run["score"])
    ingest = ingest_flow(run_date=RUN_DATE, input=pipeline_run["generated"]["files"], overrides=ov)
    assert ingest["events_written"] == 0  # merge: every row is stored already, no new table version
    assert ingest["table_version"] == pipeline_run["ingest"]["table_version"]
    train = train_flow(run_date=RUN_DATE, overrides=ov)
    # the recorded training is returned, not a new one
    assert train["training"]["run_id"] == pipeline_run["train"]["training"]["run_id"]
    assert train["training"]["model_version"] == pipeline_run["train"]["training"]["model_version"]
    assert train["decision"]["promoted"] is False  # already the champion
    again = score_flow(run_date=RUN_DATE, overrides=ov)
    assert read_export(again).equals(before)


def test_dask_sharded_scoring_matches_single_process(pipeline_run, ov):
    from flows.score import score_flow

    export = Path(pipeline_run["score"]["path"])
    single = read_export(pipeline_run["score"])
    single_manifest = json.loads((export / "_manifest.json").read_text())  # the latest single-process run
    sharded = score_flow(run_date=RUN_DATE, shards=2, executor="dask", dask_workers=2, overrides=ov)
    assert sharded["shards"] == 2
    assert read_export(sharded).equals(single)
    assert sharded["counts"]["users_scored"] == single_manifest["counts"]["users_scored"]
    assert sharded["input"]["snapshot_hash"] == single_manifest["input"]["snapshot_hash"]
    assert sharded["model"] == single_manifest["model"]
    threads = score_flow(run_date=RUN_DATE, shards=3, executor="threads", overrides=ov)
    assert read_export(threads).equals(single)


def test_demo_summary_prints_titles_and_metrics(pipeline_run, ov):
    from flows.demo import print_summary

    console = Console(record=True, width=160)
    print_summary(console, {**pipeline_run, "wall_seconds": 1.0}, ov, n_users=2)
    text = console.export_text()
    assert pipeline_run["score"]["path"] in text
    assert "next watch" in text and "most popular" in text and "recsys ui" in text
    titles = pl.read_parquet(pipeline_run["catalogue"])["title"].to_list()
    assert any(t in text for t in titles)
