"""Train flow: events -> sessions -> split -> tracked GRU4Rec training (MLflow) -> optional promotion."""

from __future__ import annotations

from datetime import date
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from flows._common import (
    as_plain,
    config_fingerprint,
    data_root_slot,
    flow_config,
    forward_library_logs,
    io_task,
    resolve_run_date,
)
from flows.promote import promote_flow
from flows.reports import training_report
from recsys.config import Config
from recsys.schemas import TEST_FILE, TRAIN_FILE, VALID_FILE, VOCAB_FILE

forward_library_logs()

TRAINING_REPORT_KEY = "training-report"
MLFLOW_RUN_KEY = "mlflow-run"


@task(name="build-sessions", cache_policy=NO_CACHE)
def sessions_task(config: Config) -> dict[str, Any]:
    """Events -> sessions Parquet (reads and writes files under the data root)."""
    from recsys.data.sessions import build_sessions

    return as_plain(build_sessions(config))


@task(name="split-sessions", cache_policy=NO_CACHE)
def split_task(config: Config) -> dict[str, Any]:
    """Sessions -> train/valid/test + vocabulary + stats.json."""
    from recsys.data.split import split_sessions

    return as_plain(split_sessions(config))


def training_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """One training per (run date, resolved config, tracking store, split data): a re-run reuses it."""
    from recsys.tracking.store import resolve_tracking_uri

    config: Config = parameters["config"]
    split = config.paths.split_dir
    # the split's data files (stats.json holds timings, so it is left out)
    files = [split / name for name in (TRAIN_FILE, VALID_FILE, TEST_FILE, VOCAB_FILE)]
    fingerprint = config_fingerprint(config, *files, extra=resolve_tracking_uri(config))
    return f"train-{parameters['run_date']}-{fingerprint}"


# No retries: a failed training is a bug or an out-of-memory to look at, not a transient error.
# The result (run id, model version, metrics) is persisted as JSON and keyed by training_cache_key, so a
# re-run for the same run date and data does not register a second model version (idempotent).
@task(
    name="train-gru4rec",
    retries=0,
    cache_key_fn=training_cache_key,
    persist_result=True,
    result_serializer="json",
)
def train_task(config: Config, run_date: str) -> dict[str, Any]:
    """Train GRU4Rec with MLflow tracking; registers a model version as @challenger."""
    from recsys.tracking.runs import tracked_training

    return as_plain(tracked_training(config))


@task(name="mlflow-run-url", cache_policy=NO_CACHE)
def run_url_task(config: Config, run_id: str) -> str:
    """Link to the run in the MLflow UI a browser can open (`tracking.ui_url`; never a credential)."""
    from recsys.tracking.runs import run_url
    from recsys.tracking.store import connect

    return run_url(config, connect(config), run_id)


@flow(name="train")
def train_flow(
    run_date: date | None = None,
    prepare: bool = True,
    promote: bool = True,
    force: bool = False,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Weekly training.

    With `prepare`, rebuilds sessions and the temporal train/valid/test split from the events store;
    then trains GRU4Rec (tracked in MLflow: params, per-epoch metrics, system metrics, lineage),
    registers the model as @challenger and, with `promote`, runs the champion/challenger gate on
    exactly the version this training registered. Idempotent per run date: a re-run on the same data
    and config returns the recorded training instead of registering another version (`force=True`
    retrains). Training is never retried. One training per data root at a time: a second one waits
    for the first to finish (see flows._common.data_root_slot).
    """
    config = flow_config(overrides)
    day = str(resolve_run_date(run_date))
    with data_root_slot(config, f"train {day}"):
        return _train(config, day, prepare, promote, force, overrides)


def _train(config: Config, day: str, prepare: bool, promote: bool, force: bool,
           overrides: list[str] | None) -> dict[str, Any]:
    logger = get_run_logger()
    if prepare:
        sessions = io_task(sessions_task, config)(config)
        logger.info("sessions: %s sequences, %s events, %s items", sessions.get("sessions"),
                    sessions.get("events"), sessions.get("items"))
        split = io_task(split_task, config)(config)
        logger.info("split: %s sequences per part, vocabulary %s", {k: v.get("sequences") for k, v in
                    (split.get("splits") or {}).items()}, split.get("vocab_size"))
    # The recorded result lives beside the data it describes (deleting the data root resets both).
    results = (config.paths.prefect_home / "results").resolve()
    training = train_task.with_options(result_storage=results, refresh_cache=force)(config, day)
    logger.info("training run %s -> model version %s", training.get("run_id"), training.get("model_version"))
    url = io_task(run_url_task, config)(config, training["run_id"])
    create_link_artifact(link=url, link_text=f"MLflow run {training['run_id']}", key=MLFLOW_RUN_KEY,
                         description=f"Training run of {day}")
    decision = promote_flow(version=training["model_version"], overrides=overrides) if promote else None
    create_markdown_artifact(markdown=training_report(day, training, decision, url), key=TRAINING_REPORT_KEY,
                             description=f"Training {day}: metrics vs baselines and champion, promotion")
    return {"run_date": day, "training": training, "decision": decision, "run_url": url}
