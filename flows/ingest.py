"""Ingest flow: raw viewing logs -> validated, de-duplicated events in the Delta table (+ quarantine)."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows._common import as_plain, flow_config, forward_library_logs, io_task, resolve_run_date
from recsys.config import Config

forward_library_logs()

INGEST_STATS_KEY = "ingest-stats"


@task(name="ingest-files", cache_policy=NO_CACHE)
def ingest_task(inputs: list[Path], config: Config) -> dict[str, Any]:
    """Run the library's ingest; returns the report as a small dict (never frames)."""
    from recsys.data.ingest import ingest_files

    return as_plain(ingest_files(inputs, config))


def ingest_stats_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the ingest-stats artifact: totals first, then one row per quarantine reason."""
    quarantined = report.get("quarantined") or {}
    rows = [
        {"measure": "rows in", "value": report.get("rows_in")},
        {"measure": "events written", "value": report.get("events_written")},
        {"measure": "duplicates removed", "value": report.get("duplicates")},
        {"measure": "quarantined (total)", "value": sum(quarantined.values())},
        {"measure": "partitions written", "value": len(report.get("partitions") or [])},
        {"measure": "partitions replaced", "value": len(report.get("replaced") or {})},
        {"measure": "events table version", "value": report.get("table_version")},
    ]
    rows += [{"measure": f"quarantined: {reason}", "value": n} for reason, n in sorted(quarantined.items())]
    return rows


def default_inputs(config: Config) -> list[Path]:
    """With no input: the event files listed by the generator's manifest under raw/ (not its catalogue),
    else raw/ itself as a Parquet directory."""
    from recsys.data.synthetic import MANIFEST_FILE

    files: list[Path] = []
    for manifest in sorted(config.paths.raw_dir.glob(f"*/{MANIFEST_FILE}")):
        files += [manifest.parent / name for name in json.loads(manifest.read_text()).get("files", [])]
    return files or [config.paths.raw_dir]


@flow(name="ingest", log_prints=False)
def ingest_flow(
    run_date: date | None = None,
    input: list[str] | None = None,  # noqa: A002 - the parameter name users see in the UI
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Ingest raw viewing logs into the events store.

    Reads the files or directories in `input` (default: the data root's raw/ directory), validates and
    normalises every row, removes duplicates, writes events partitioned by event date and quarantines
    rejected rows with a reason, as one commit of the events table. The default merge mode only adds events
    not stored yet: late events delete nothing and re-running for the same inputs adds nothing (idempotent).
    `overrides` are config overrides such as `ingest.preset=movielens-100k`.
    """
    logger = get_run_logger()
    config = flow_config(overrides)
    day = resolve_run_date(run_date)
    inputs = [Path(p) for p in input] if input else default_inputs(config)
    logger.info("ingest run_date=%s inputs=%s -> %s", day, [str(p) for p in inputs], config.paths.events_dir)
    report = io_task(ingest_task, config)(inputs, config)
    create_table_artifact(
        table=ingest_stats_table(report),
        key=INGEST_STATS_KEY,
        description=f"Ingest {day}: rows in/out, quarantined by reason ({', '.join(map(str, inputs))})",
    )
    logger.info(
        "ingested %s rows -> %s events, %s quarantined",
        report.get("rows_in"),
        report.get("events_written"),
        sum((report.get("quarantined") or {}).values()),
    )
    return {"run_date": str(day), "events_dir": str(config.paths.events_dir), **report}
