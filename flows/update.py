"""Update flow: events -> sessions -> split -> incremental update of @champion (MLflow) -> promotion.

The daily schedule is ingest -> update -> promote -> score (weekly still a full training): ``daily_flow``
chains the four for one day; the deployments run them as separate scheduled flows.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from flows._common import (
    as_plain,
    config_fingerprint,
    flow_config,
    forward_library_logs,
    io_task,
    resolve_run_date,
)
from flows.ingest import ingest_flow
from flows.promote import promote_flow
from flows.score import score_flow
from flows.train import sessions_task, split_task
from recsys.config import Config
from recsys.schemas import TRAIN_FILE, VALID_FILE

forward_library_logs()

UPDATE_REPORT_KEY = "update-report"


def default_catalogue(config: Config) -> Path | None:
    """The generator's ``raw/*/catalogue.parquet`` when there is one (real data passes its own)."""
    found = sorted(config.paths.raw_dir.glob("*/catalogue.parquet"))
    return found[0] if found else None


@task(name="ingest-catalogue", cache_policy=NO_CACHE)
def catalogue_task(config: Config, path: str) -> dict[str, Any]:
    """Validate and publish the item catalogue (bad rows quarantined)."""
    from recsys.data.catalogue import catalogue_summary, ingest_catalogue

    return as_plain(catalogue_summary(ingest_catalogue(Path(path), config)))


def update_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """One update per (run date, config, split data, champion): a re-run reuses the registered version."""
    from recsys.tracking.store import resolve_tracking_uri

    config: Config = parameters["config"]
    split = config.paths.split_dir
    files = [split / TRAIN_FILE, split / VALID_FILE, config.paths.catalogue_file]
    fingerprint = config_fingerprint(config, *files, extra=resolve_tracking_uri(config))
    return f"update-{parameters['run_date']}-{parameters['parent_version']}-{fingerprint}"


@task(name="update-champion", retries=0, cache_key_fn=update_cache_key, persist_result=True,
      result_serializer="json")
def update_task(config: Config, run_date: str, parent_version: str) -> dict[str, Any]:
    """Grow + warm-start the parent version; registers the result as @challenger (never retried)."""
    from recsys.tracking.update_run import tracked_update

    return as_plain(tracked_update(config, as_of=date.fromisoformat(run_date)))


@task(name="parent-version", cache_policy=NO_CACHE)
def parent_version_task(config: Config) -> str:
    """The registered version the update starts from (``update.parent``, @champion by default)."""
    from recsys.tracking.registry import resolve_model
    from recsys.tracking.update_run import parent_uri

    return resolve_model(config, parent_uri(config)).version


def update_report(day: str, update: dict[str, Any], decision: dict[str, Any] | None) -> str:
    sources = update.get("init_sources") or {}
    lines = [f"# Update {day}", "", f"- {update.get('lineage')}",
             f"- new items: {update.get('n_new_items')} (rows from series {sources.get('series', '–')}, "
             f"genre {sources.get('genre', '–')}, popularity {sources.get('popularity', '–')})",
             f"- sequences: {update.get('new_sequences', '–')} new + "
             f"{update.get('replay_sequences', '–')} replay",
             f"- seconds: {update.get('seconds', '–')}",
             f"- registered version {update.get('model_version')} as @challenger"]
    if decision:
        lines.append(f"- promotion: {'promoted' if decision.get('promoted') else 'kept champion'} — "
                     f"{decision.get('reason')}")
    return "\n".join(lines) + "\n"


@flow(name="update")
def update_flow(
    run_date: date | None = None,
    prepare: bool = True,
    promote: bool = True,
    catalogue: str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Daily incremental update of the champion.

    With `prepare`, rebuilds sessions and the temporal split from the events store (as the weekly
    training does). Ingests `catalogue` (default: the generator's under raw/, when present), then grows
    the @champion's vocabulary with the items that appeared since its data and the catalogue titles
    released by `run_date`, warm-starts a short pass over the newest sequences plus a replay of older
    ones, registers the result as @challenger ("updated from version N with events up to T") and, with
    `promote`, runs the same champion/challenger gate as a full training. A killed update leaves the
    champion untouched and resumes from its own checkpoint directory; a re-run for the same day and
    data returns the recorded update.
    """
    logger = get_run_logger()
    config = flow_config(overrides)
    day = str(resolve_run_date(run_date))
    if prepare:
        io_task(sessions_task, config)(config)
        split = io_task(split_task, config)(config)
        logger.info("split: %s sequences per part", {k: v.get("sequences") for k, v in
                                                     (split.get("splits") or {}).items()})
    source = catalogue or default_catalogue(config)
    if source is not None:
        io_task(catalogue_task, config)(config, str(source))
    parent = io_task(parent_version_task, config)(config)
    results = (config.paths.prefect_home / "results").resolve()
    update = update_task.with_options(result_storage=results)(config, day, parent)
    logger.info("%s -> version %s", update.get("lineage"), update.get("model_version"))
    decision = promote_flow(overrides=overrides) if promote else None
    create_markdown_artifact(markdown=update_report(day, update, decision), key=UPDATE_REPORT_KEY,
                             description=f"Update {day}: new items, lineage, promotion")
    return {"run_date": day, "update": update, "decision": decision}


@flow(name="daily")
def daily_flow(
    run_date: date | None = None,
    input: list[str] | None = None,  # noqa: A002 - the parameter name users see in the UI
    catalogue: str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """One day of the daily schedule: ingest -> update -> promote -> score, each its own flow run."""
    day = resolve_run_date(run_date)
    ingest = ingest_flow(run_date=day, input=input, overrides=overrides)
    update = update_flow(run_date=day, catalogue=catalogue, overrides=overrides)
    score = score_flow(run_date=day, alias="champion", overrides=overrides)
    return {"run_date": str(day), "ingest": ingest, "update": update, "score": score}
