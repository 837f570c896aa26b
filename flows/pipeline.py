"""End-to-end pipeline: (generate) -> ingest -> sessions -> split -> train -> promote -> score."""

from __future__ import annotations

from datetime import date
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows._common import (
    as_plain,
    data_root_slot,
    flow_config,
    forward_library_logs,
    io_task,
    resolve_run_date,
)
from flows.ingest import ingest_flow
from flows.reports import pipeline_summary
from flows.score import score_flow
from flows.train import train_flow
from recsys.config import Config

forward_library_logs()

PIPELINE_SUMMARY_KEY = "pipeline-summary"


@task(name="generate-synthetic", cache_policy=NO_CACHE)
def generate_task(config: Config) -> dict[str, Any]:
    """Write the embedded synthetic viewing logs (deterministic for a seed) and their catalogue."""
    from recsys.data.synthetic import generate

    return as_plain(generate(config))


@flow(name="pipeline")
def pipeline_flow(
    run_date: date | None = None,
    input: list[str] | None = None,  # noqa: A002 - the parameter name users see in the UI
    shards: int = 1,
    executor: Literal["threads", "dask"] = "threads",
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """The whole pipeline for one run date, each stage reading the previous stage's output by path.

    Without `input`, first writes the embedded synthetic viewing logs. Then ingest, sessions, temporal
    split, GRU4Rec training tracked in MLflow, the champion/challenger gate, and batch scoring with the
    champion into exports/recs/run_date=YYYY-MM-DD/ (published atomically). Each stage is its own
    flow run with its artifacts; re-running for the same run date republishes the same export.
    `shards` > 1 scores user shards in parallel on `executor` (threads, or a local Dask cluster).
    Pipelines for different run dates share the data root, so they run one after the other: a second
    one waits for the first (flows._common.data_root_slot).
    """
    config = flow_config(overrides)
    day = resolve_run_date(run_date)
    with data_root_slot(config, f"pipeline {day}"):
        return _pipeline(config, day, input, shards, executor, overrides)


def _pipeline(config: Config, day: date, input: list[str] | None, shards: int,  # noqa: A002
              executor: Literal["threads", "dask"], overrides: list[str] | None) -> dict[str, Any]:
    logger = get_run_logger()
    generated = None
    if not input:
        generated = io_task(generate_task, config)(config)
        input = list(generated["files"])
        logger.info("generated %s events for %s users into %s", generated.get("events"),
                    generated.get("users"), generated.get("out_dir"))
    ingest = ingest_flow(run_date=day, input=input, overrides=overrides)
    train = train_flow(run_date=day, prepare=True, promote=True, overrides=overrides)
    score = score_flow(run_date=day, alias="champion", shards=shards, executor=executor, overrides=overrides)
    logger.info("pipeline %s done: export at %s", day, score.get("path"))
    summary = {
        "run_date": str(day),
        "generated": generated,
        "ingest": ingest,
        "train": train,
        "score": score,
        "catalogue": (generated or {}).get("catalogue"),
    }
    create_markdown_artifact(markdown=pipeline_summary(summary), key=PIPELINE_SUMMARY_KEY,
                             description=f"Pipeline {day}: every stage, the reports, metrics and slices")
    return summary
