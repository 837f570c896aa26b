"""A daily update recorded in MLflow: one run, the updated model registered as ``@challenger``.

The parent is the registered version behind ``update.parent`` (``@champion`` by default). Nothing in the
registry changes until the update has finished: a killed update leaves the champion as it was, and the
next call continues the same checkpoint directory and its unfinished run. The promotion gate
(recsys.tracking.promotion.promote) then decides, exactly as after a full training.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import date
from pathlib import Path
from typing import Any

import mlflow

from recsys.config import Config, flatten_config
from recsys.tracking.lineage import UPDATED_FROM_TAG, lineage_tags, update_lineage_tags
from recsys.tracking.registry import log_and_register, resolve_model
from recsys.tracking.runs import checkpoint_dir_lock, epoch_metrics
from recsys.tracking.store import TrackingStore, connect, with_retries

logger = logging.getLogger(__name__)


def parent_uri(config: Config) -> str:
    """``models:/NAME@alias`` or ``models:/NAME/N`` for ``update.parent``."""
    ref = config.update.parent
    name = config.tracking.registered_model
    return f"models:/{name}/{ref}" if ref.isdigit() else f"models:/{name}@{ref.lstrip('@')}"


def _run(store: TrackingStore, config: Config, checkpoint_dir: Path, tags: dict[str, str]) -> str:
    """The unfinished run of this checkpoint directory (a resumed update), or a new one."""
    runs = store.client.search_runs(
        [store.experiment_id],
        filter_string=(f"tags.`recsys.checkpoint_dir` = '{checkpoint_dir}' "
                       "and attributes.status != 'FINISHED'"),
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    if runs:
        mlflow.start_run(run_id=runs[0].info.run_id, log_system_metrics=False)
        return runs[0].info.run_id
    run = mlflow.start_run(experiment_id=store.experiment_id,
                           run_name=f"{config.update.run_name}-v{tags['v']}", log_system_metrics=False,
                           tags={k: v for k, v in tags.items() if k != "v"})
    mlflow.log_params(flatten_config(config), run_id=run.info.run_id)
    return run.info.run_id


def _registered(store: TrackingStore, checkpoint_dir: Path) -> dict[str, Any] | None:
    """The result of a finished, registered update of ``checkpoint_dir`` (re-runs are idempotent)."""
    runs = store.client.search_runs(
        [store.experiment_id],
        filter_string=(f"tags.`recsys.checkpoint_dir` = '{checkpoint_dir}' "
                       "and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    if not runs:
        return None
    versions = store.client.search_model_versions(f"run_id = '{runs[0].info.run_id}'")
    if not versions:
        return None
    tags = runs[0].data.tags
    return {"run_id": runs[0].info.run_id, "model_version": str(versions[0].version),
            "registered_model": versions[0].name, "parent_version": tags.get("lineage.parent_version"),
            "events_up_to": tags.get("lineage.events_up_to"),
            "n_new_items": int(tags.get("lineage.new_items", 0)), "lineage": tags.get(UPDATED_FROM_TAG),
            "checkpoint": str(checkpoint_dir / "updated.pt"), "tracking_uri": store.uri, "reused": True}


def tracked_update(config: Config, as_of: date | None = None) -> dict[str, Any]:
    """Update the parent version, log the run, register the result as ``@challenger``.

    Returns ``{"run_id", "model_version", "parent_version", "events_up_to", "n_new_items", ...}``.
    """
    from recsys.data.catalogue import load_catalogue
    from recsys.training.update import (
        read_update_sequences,
        split_cutoff,
        update_checkpoint_dir,
        update_model,
    )

    store = connect(config)
    parent = resolve_model(config, parent_uri(config))
    split_dir = config.paths.split_dir
    cutoff = split_cutoff(split_dir, read_update_sequences(split_dir))
    label = f"version {parent.version}"
    checkpoint_dir = update_checkpoint_dir(config, label, cutoff).resolve()
    if (done := _registered(store, checkpoint_dir)) is not None:  # already finished: no second version
        logger.info("update of %s already registered as version %s", label, done["model_version"])
        return done
    with checkpoint_dir_lock(checkpoint_dir):
        tags = {"recsys.kind": "update", "recsys.checkpoint_dir": str(checkpoint_dir), "v": parent.version,
                **lineage_tags(split_dir, config.paths.events_dir, config.train.seed)}
        run_id = with_retries(lambda: _run(store, config, checkpoint_dir, tags), config, "starting the run",
                              store.uri)
        try:
            result = update_model(config, parent.checkpoint_path, label, split_dir, checkpoint_dir,
                                  catalogue=load_catalogue(config), as_of=as_of)
        except BaseException:
            with contextlib.suppress(Exception):
                mlflow.end_run(status="FAILED")
            raise
    lineage = update_lineage_tags(parent.version, result.events_up_to, result.n_new_items)
    metrics = {"update_seconds": result.seconds, "n_items": float(result.n_items),
               "new_items": float(result.n_new_items), "new_sequences": float(result.new_sequences),
               "replay_sequences": float(result.replay_sequences),
               **{f"init_{k}": float(v) for k, v in result.init_sources.items()}}

    def finish() -> Any:
        mlflow.set_tags(lineage)
        for entry in result.history:
            mlflow.log_metrics(epoch_metrics(entry), step=int(entry["epoch"]), run_id=run_id)
        mlflow.log_metrics(metrics, run_id=run_id)
        version = log_and_register(config, result.checkpoint, run_id)
        for key, value in lineage.items():
            store.client.set_model_version_tag(version.name, str(version.version), key, value)
        return version

    try:
        version = with_retries(finish, config, "logging and registering the update", store.uri)
    except BaseException:
        with contextlib.suppress(Exception):
            mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run(status="FINISHED")
    logger.info("%s -> %s version %s (@challenger)", lineage[UPDATED_FROM_TAG], version.name,
                version.version)
    return {"run_id": run_id, "model_version": str(version.version), "registered_model": version.name,
            "parent_version": parent.version, "events_up_to": result.events_up_to,
            "n_new_items": result.n_new_items, "n_items": result.n_items, "init_sources": result.init_sources,
            "new_sequences": result.new_sequences, "replay_sequences": result.replay_sequences,
            "seconds": result.seconds, "checkpoint": str(result.checkpoint), "history": result.history,
            "lineage": lineage[UPDATED_FROM_TAG], "tracking_uri": store.uri}
