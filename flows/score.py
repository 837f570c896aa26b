"""Score flow: the @champion (or any alias) -> top-K next-watch lists for every user, published atomically.

Scale-out: with ``shards > 1`` the users are split into disjoint shards (by a stable hash of the user id)
scored as parallel tasks on a task runner, then merged and published once. ``executor="dask"`` runs the
shards on a Dask cluster: a local one (``dask_workers`` processes) or an existing one at ``dask_address``
(e.g. ``tcp://scheduler:8786``); the export is identical to the single-process one either way.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.task_runners import ThreadPoolTaskRunner

from flows._common import as_plain, flow_config, forward_library_logs, io_task, resolve_run_date
from flows.reports import export_summary_table, monitoring_markdown
from recsys.config import Config
from recsys.serving.monitoring import ExportMonitoringError

forward_library_logs()

EXPORT_SUMMARY_KEY = "export-summary"
EXPORT_MONITORING_KEY = "export-monitoring"
EXPORT_REPORT_KEY = "export-report"


def champion_uri(config: Config, alias: str) -> str:
    """``models:/<registered model>@<alias>``."""
    return f"models:/{config.tracking.registered_model}@{alias}"


@task(name="score-users", cache_policy=NO_CACHE)
def score_task(config: Config, model_uri: str, run_date: date) -> dict[str, Any]:
    """Single-process scoring and publication; returns the export manifest."""
    from recsys.serving.score import score_users

    return as_plain(score_users(config, model_uri=model_uri, run_date=run_date))


@task(name="score-shard", cache_policy=NO_CACHE)
def score_shard_task(
    config: Config, model_uri: str, run_date: date, shard: int, n_shards: int
) -> dict[str, Any]:
    """Score one shard of the users into the export's staging area; returns the shard's small summary."""
    from recsys.serving.shards import score_shard

    return as_plain(score_shard(config, model_uri, run_date, shard=shard, n_shards=n_shards))


@task(name="publish-shards", cache_policy=NO_CACHE)
def publish_shards_task(config: Config, run_date: date, shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge the shards' outputs, validate and publish the export atomically; returns the manifest."""
    from recsys.serving.shards import publish_shards

    return as_plain(publish_shards(config, shards, run_date=run_date))


@task(name="export-report", cache_policy=NO_CACHE)
def export_report_task(config: Config, run_date: date, manifest: dict[str, Any]) -> dict[str, Any]:
    """The export's HTML report (monitoring over the last run dates), also logged to MLflow when reachable."""
    import logging

    from recsys.serving.export_report import log_export_report, write_export_report

    path = write_export_report(config.paths.exports_dir, run_date, config.score.monitoring, manifest)
    run_id = None
    try:
        run_id = log_export_report(config, run_date, path, manifest.get("monitoring") or {})
    except Exception as exc:  # noqa: BLE001 - the report is on disk; the store is optional for scoring
        logging.getLogger("recsys").warning("export report not logged to MLflow: %s", exc)
    return {"report_path": str(path), "mlflow_run_id": run_id}


def publish_monitoring(config: Config, day: date, manifest: dict[str, Any]) -> dict[str, Any]:
    """Export report + artifacts (monitoring markdown, link to the report); returns the report's paths."""
    if not manifest.get("monitoring"):
        return {}
    report = io_task(export_report_task, config)(config, day, manifest)
    create_markdown_artifact(markdown=monitoring_markdown(manifest, report["report_path"]),
                             key=EXPORT_MONITORING_KEY, description=f"Export monitoring {day}")
    create_link_artifact(link=Path(report["report_path"]).resolve().as_uri(), key=EXPORT_REPORT_KEY,
                         link_text=f"export report {day}", description=f"Export report {day} (HTML)")
    return report


@flow(name="score-shards")
def score_shards_flow(config: Config, model_uri: str, run_date: date, n_shards: int) -> list[dict[str, Any]]:
    """Fan the shards out over this flow's task runner (threads, or Dask via with_options)."""
    shard_task = io_task(score_shard_task, config)
    futures = [shard_task.submit(config, model_uri, run_date, i, n_shards) for i in range(n_shards)]
    return [f.result() for f in futures]


def current_api_url() -> str:
    """URL of the Prefect API this flow run talks to (also the temporary one of an ephemeral run)."""
    with get_client(sync_client=True) as client:
        return str(client.api_url)


def shard_runner(executor: str, dask_address: str | None, dask_workers: int) -> Any:
    """The task runner for the shards: a thread pool, or Dask (local cluster or an existing scheduler).

    Local Dask workers are told this run's API URL: otherwise each spawned worker process would start
    a temporary Prefect server of its own (~20 s each) to report its task runs to.
    """
    if executor == "threads":
        return ThreadPoolTaskRunner(max_workers=dask_workers)
    from prefect_dask import DaskTaskRunner

    if dask_address:  # a real cluster: its workers need PREFECT_API_URL and the data root themselves
        return DaskTaskRunner(address=dask_address)
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": dask_workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
        "env": {"PREFECT_API_URL": current_api_url()},
    })


@flow(name="score")
def score_flow(
    run_date: date | None = None,
    alias: str = "champion",
    shards: int = 1,
    executor: Literal["threads", "dask"] = "threads",
    dask_address: str | None = None,
    dask_workers: int = 2,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Daily batch scoring.

    Loads the registered model version behind `alias` (default @champion), builds every user's history
    from the events store, writes each user's top-K unseen items to exports/recs/run_date=YYYY-MM-DD/
    and publishes it atomically (_manifest.json last). Re-running for the same run date replaces the
    partition with the same content. `shards` > 1 scores disjoint user shards in parallel on `executor`
    ("threads" in this process, or "dask": a local cluster of `dask_workers` processes, or the existing
    cluster at `dask_address`).
    """
    logger = get_run_logger()
    config = flow_config(overrides)
    day = resolve_run_date(run_date)
    model_uri = champion_uri(config, alias)
    logger.info("scoring %s with %s in %d shard(s)", day, model_uri, shards)
    if shards <= 1:
        try:
            manifest = io_task(score_task, config)(config, model_uri, day)
        except ExportMonitoringError:  # refused: still show the team why, then fail the flow
            from recsys.serving.monitoring import load_series

            failed = next((r for r in load_series(config.paths.exports_dir, until=day, last=1)
                           if r["run_date"] == day.isoformat()), None)
            if failed is not None:
                publish_monitoring(config, day, {"monitoring": failed, "run_date": day.isoformat()})
            raise
    else:
        runner = shard_runner(executor, dask_address, dask_workers)
        parts = score_shards_flow.with_options(task_runner=runner)(config, model_uri, day, shards)
        manifest = io_task(publish_shards_task, config)(config, day, parts)
    create_table_artifact(table=export_summary_table(manifest), key=EXPORT_SUMMARY_KEY,
                          description=f"Export {day}: {manifest.get('path', '')}")
    logger.info("published %s rows to %s", manifest.get("rows"), manifest.get("path"))
    report = publish_monitoring(config, day, manifest)
    if report:
        mon = manifest["monitoring"]
        (logger.warning if mon.get("findings") else logger.info)(
            "monitoring %s; export report %s", mon.get("status"), report["report_path"])
    return {**manifest, **report}
