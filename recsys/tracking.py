"""MLflow tracking: where runs go, and a training run recorded end to end.

The default store is embedded (a SQLite file and an artifact folder under ``paths.data_root/mlflow``) so
nothing has to be started by hand; ``tracking.tracking_uri`` or ``$MLFLOW_TRACKING_URI`` point at a
real server instead. Every call to the store goes through :func:`with_retries` (bounded, exponential
backoff) and MLflow's own HTTP retries are capped, so an unreachable server produces a clear error in
seconds instead of hanging a run. Training never depends on the store: if it is down, the checkpoint is
kept and the error says how to register it later.
"""

from __future__ import annotations

import os

# Before mlflow is imported anywhere through this module: no telemetry, and HTTP calls that give up
# quickly (our own retries below are the bounded ones). Values set by the user win.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import contextlib  # noqa: E402
import fcntl  # noqa: E402
import logging  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator, Mapping  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, TypeVar  # noqa: E402

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from recsys.config import Config, config_to_yaml, flatten_config  # noqa: E402
from recsys.lineage import lineage_tags  # noqa: E402
from recsys.run_report import (  # noqa: E402
    metric_key,
    metrics_markdown,
    numeric_items,
    write_epoch_csv,
    write_epoch_plot,
)
from recsys.schemas import STATS_FILE  # noqa: E402

logger = logging.getLogger(__name__)
T = TypeVar("T")

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
# MLflow error codes that a later attempt may not see again (server down, overloaded, DB locked).
TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}


class TrackingUnavailableError(RuntimeError):
    """The tracking store could not be reached after the configured retries."""


@dataclass(frozen=True)
class TrackingStore:
    """A reachable tracking store and the experiment runs go to."""

    uri: str
    experiment: str
    experiment_id: str
    artifact_location: str | None  # set for the embedded store only

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    @property
    def embedded(self) -> bool:
        return self.uri.startswith("sqlite:")


def resolve_tracking_uri(config: Config) -> str:
    """``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the SQLite file under the data root."""
    if config.tracking.tracking_uri:
        return config.tracking.tracking_uri
    if env := os.environ.get("MLFLOW_TRACKING_URI"):
        return env
    return f"sqlite:///{(config.paths.mlflow_dir / DB_FILE).resolve()}"


def embedded_artifact_location(config: Config) -> str:
    """``file://`` URI of the artifact folder next to the embedded database."""
    path = (config.paths.mlflow_dir / ARTIFACTS_DIR).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path.as_uri()


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: connection failures, timeouts, a locked SQLite database, a 5xx from the server."""
    if isinstance(exc, MlflowException):
        return exc.error_code in TRANSIENT_CODES
    if isinstance(exc, OSError):
        return True
    try:
        from sqlalchemy.exc import OperationalError

        if isinstance(exc, OperationalError):
            return True
    except ImportError:  # sqlalchemy is an mlflow dependency; absent only with mlflow-skinny
        pass
    try:
        import requests

        return isinstance(exc, requests.RequestException)
    except ImportError:
        return False


def _short(exc: BaseException, limit: int = 160) -> str:
    line = (str(exc).splitlines() or [type(exc).__name__])[0]
    return line if len(line) <= limit else line[: limit - 1] + "…"


def with_retries(fn: Callable[[], T], config: Config, what: str, uri: str | None = None) -> T:
    """Call ``fn``; on transient errors retry ``tracking.retries`` times with doubling backoff.

    The final failure is a :class:`TrackingUnavailableError` naming the URI and the last error.
    """
    uri = uri or resolve_tracking_uri(config)
    attempts = config.tracking.retries + 1
    delay = config.tracking.retry_backoff_seconds
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == attempts:
                raise TrackingUnavailableError(
                    f"MLflow tracking store {uri} is unreachable ({what} failed {attempts} time(s)); "
                    f"last error: {_short(exc)}"
                ) from exc
            logger.warning("%s against %s failed (attempt %d/%d), retrying in %.1f s: %s",
                           what, uri, attempt, attempts, delay, _short(exc))
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")  # the loop either returns or raises


@contextlib.contextmanager
def _init_lock(config: Config, uri: str) -> Iterator[None]:
    """Serialise first-time creation of the embedded database between processes (table creation races)."""
    if not uri.startswith("sqlite:"):
        yield
        return
    lock_dir = config.paths.mlflow_dir
    lock_dir.mkdir(parents=True, exist_ok=True)
    with (lock_dir / ".init.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as exc:  # created by a concurrent process in between
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        experiment = client.get_experiment_by_name(name)
        assert experiment is not None
        return experiment.experiment_id


def connect(config: Config) -> TrackingStore:
    """Point MLflow (tracking and registry) at the configured store and make sure the experiment exists.

    Raises :class:`TrackingUnavailableError` after the configured retries when the store is unreachable.
    """
    uri = resolve_tracking_uri(config)
    artifact_location = embedded_artifact_location(config) if uri.startswith("sqlite:") else None
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)

    def open_store() -> str:
        # Creating the client creates (and migrates) the tables of an embedded database; the registry
        # store does the same on first use: both happen here, under the lock.
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_registered_models(max_results=1)
        return _ensure_experiment(client, config.tracking.experiment, artifact_location)

    with _init_lock(config, uri):
        experiment_id = with_retries(open_store, config, "opening the experiment", uri)
    mlflow.set_experiment(experiment_id=experiment_id)
    return TrackingStore(uri, config.tracking.experiment, experiment_id, artifact_location)


# --- a training run --------------------------------------------------------------------------------


class EpochLogger:
    """``on_epoch`` callback for ``train_model``: per-epoch metrics with ``step=epoch``.

    A store that fails mid-training must not stop training: the first failure is remembered, logged once,
    and later epochs are not sent (the checkpoint and history still hold everything).
    """

    def __init__(self, config: Config, run_id: str | None, uri: str) -> None:
        self.config, self.run_id, self.uri = config, run_id, uri
        self.error: Exception | None = None
        self.history: list[dict[str, Any]] = []

    def __call__(self, info: dict[str, Any]) -> None:
        self.history.append(info)
        if self.run_id is None or self.error is not None:
            return
        epoch = int(info.get("epoch", len(self.history)))
        values = epoch_metrics(info)
        try:
            with_retries(lambda: mlflow.log_metrics(values, step=epoch, run_id=self.run_id),
                         self.config, f"logging epoch {epoch}", self.uri)
        except TrackingUnavailableError as exc:
            self.error = exc
            logger.error("tracking stopped at epoch %d, training continues: %s", epoch, exc)


def epoch_metrics(info: Mapping[str, Any]) -> dict[str, float]:
    """``{'train_loss', 'events_per_second', 'epoch_seconds', 'valid_mrr_20', ...}`` from one epoch."""
    values = {k: v for k, v in numeric_items(info).items() if k != "epoch"}
    values.update({f"valid_{k}": v for k, v in numeric_items(info.get("valid") or {}).items()})
    return values


def final_metrics(test_metrics: Mapping[str, Any], baselines: Mapping[str, Mapping[str, Any]]) -> dict:
    """Test metrics of the GRU and every baseline: ``test_gru_mrr_20``, ``test_most_popular_mrr_20``..."""
    values = {f"test_gru_{k}": v for k, v in numeric_items(test_metrics).items()}
    for name, metrics in baselines.items():
        prefix = "test_" + metric_key(name).replace("-", "_").replace(" ", "_").lower()
        values.update({f"{prefix}_{k}": v for k, v in numeric_items(metrics).items()})
    return values


def best_epoch_metrics(history: list[Mapping[str, Any]], best_epoch: int) -> dict[str, float]:
    """``best_epoch`` and ``best_valid_<metric>`` of the epoch whose checkpoint was registered."""
    for entry in history:
        if int(entry.get("epoch", -1)) == int(best_epoch):
            valid = numeric_items(entry.get("valid") or {})
            return {"best_epoch": float(best_epoch), **{f"best_valid_{k}": v for k, v in valid.items()}}
    return {}


def _log_run_artifacts(config: Config, split_dir: Path, history: list[dict], test_metrics: Mapping,
                       baselines: Mapping[str, Mapping], run_id: str) -> None:
    """Resolved config, split stats, per-epoch plot and table, and the final comparison table."""
    with tempfile.TemporaryDirectory(prefix="recsys-run-") as tmp:
        out = Path(tmp)
        (out / "config.yaml").write_text(config_to_yaml(config))
        report = out / "report"
        report.mkdir()
        write_epoch_csv(history, report / "metrics_per_epoch.csv")
        write_epoch_plot(history, report / "metrics_per_epoch.png", config.promote.metric)
        table = {"gru4rec": dict(test_metrics), **{k: dict(v) for k, v in baselines.items()}}
        (report / "test_metrics.md").write_text("# Test metrics\n\n" + metrics_markdown(table))
        data = out / "data"
        data.mkdir()
        stats = Path(split_dir) / STATS_FILE
        if stats.is_file():
            (data / "split_stats.json").write_bytes(stats.read_bytes())
        mlflow.log_artifacts(str(out), run_id=run_id)


def _register_hint(checkpoint: Path | None) -> str:
    if checkpoint is None:
        return "no checkpoint was written"
    return f"the checkpoint is kept at {checkpoint}; run `recsys register --checkpoint {checkpoint}` later"


@contextlib.contextmanager
def checkpoint_dir_lock(checkpoint_dir: Path) -> Iterator[None]:
    """One training per checkpoint directory: a second one would overwrite ``last.pt``/``best.pt``."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    with (checkpoint_dir / ".lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"another training is writing {checkpoint_dir}; give this one its own directory with "
                "--set train.run_name=<name>"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _unfinished_run(store: TrackingStore, checkpoint_dir: Path) -> str | None:
    """The latest run that trained into ``checkpoint_dir`` and did not finish (to continue on resume)."""
    runs = store.client.search_runs(
        [store.experiment_id],
        filter_string=(f"tags.`recsys.checkpoint_dir` = '{checkpoint_dir}' "
                       "and attributes.status != 'FINISHED'"),
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _start_run(config: Config, store: TrackingStore, split_dir: Path, checkpoint_dir: Path,
               resume: bool) -> str:
    """A new run (tags + params once), or on resume the unfinished run of the same checkpoint directory."""
    previous = _unfinished_run(store, checkpoint_dir) if resume else None
    if previous is not None:
        mlflow.start_run(run_id=previous, log_system_metrics=config.tracking.system_metrics)
        logger.info("resuming MLflow run %s", previous)
        return previous
    tags = {"recsys.kind": "train", "recsys.checkpoint_dir": str(checkpoint_dir),
            **lineage_tags(split_dir, config.paths.events_dir, config.train.seed)}
    run = mlflow.start_run(
        experiment_id=store.experiment_id,
        run_name=f"{config.train.run_name}-{config.train.loss}-h{config.model.hidden_size}",
        log_system_metrics=config.tracking.system_metrics, tags=tags,
    )
    try:
        mlflow.log_params(flatten_config(config) | resolved_params(config), run_id=run.info.run_id)
    except Exception:
        mlflow.end_run(status="FAILED")
        raise
    return run.info.run_id


def resolved_params(config: Config) -> dict[str, str]:
    """The values that ``null`` (automatic) settings resolved to for this run, as MLflow params."""
    from recsys.evaluate import resolve_exclude_seen
    from recsys.train import resolve_mask_seen

    return {
        "resolved.evaluate.exclude_seen": str(resolve_exclude_seen(config)),
        "resolved.train.mask_seen_negatives": str(resolve_mask_seen(config)),
    }


def tracked_training(
    config: Config, split_dir: Path | None = None, resume: bool = False, checkpoint_dir: Path | None = None
) -> dict[str, Any]:
    """Train GRU4Rec inside an MLflow run, log everything, register the model as the new challenger.

    Returns ``{"run_id", "model_version", "registered_model", "metrics", "checkpoint", "tracking_uri"}``
    plus the plain training summary (``test_metrics``, ``baseline_metrics``, ``history``, ``best_epoch``,
    ``stopped_early``, ``device``). If the store is unreachable (before, during or after training)
    training still completes and a :class:`TrackingUnavailableError` names the kept checkpoint and the
    ``recsys register`` command. ``resume=True`` continues both the checkpoint (``train_model``) and its
    unfinished MLflow run. ``checkpoint_dir`` defaults to ``checkpoints/<train.run_name>``.
    """
    from recsys.registry import log_and_register
    from recsys.train import train_model

    split_dir = Path(split_dir) if split_dir is not None else config.paths.split_dir
    checkpoint_dir = Path(checkpoint_dir or config.paths.checkpoints_dir / config.train.run_name).resolve()
    uri = resolve_tracking_uri(config)
    with checkpoint_dir_lock(checkpoint_dir):
        run_id: str | None = None
        start_error: TrackingUnavailableError | None = None
        try:
            store = connect(config)
            run_id = with_retries(lambda: _start_run(config, store, split_dir, checkpoint_dir, resume),
                                  config, "starting the run", uri)
            logger.info("MLflow run %s in experiment %r at %s", run_id, store.experiment, uri)
        except TrackingUnavailableError as exc:
            logger.error("training without tracking: %s", exc)
            start_error = exc

        epochs = EpochLogger(config, run_id, uri)
        try:
            result = train_model(config, split_dir=split_dir, checkpoint_dir=checkpoint_dir, resume=resume,
                                 on_epoch=epochs)
        except BaseException:
            if run_id is not None:
                with contextlib.suppress(Exception):
                    mlflow.end_run(status="FAILED")
            raise

    checkpoint = Path(result.best_checkpoint)
    metrics = final_metrics(result.test_metrics, result.baseline_metrics)
    metrics.update(best_epoch_metrics(list(result.history), getattr(result, "best_epoch", 0)))
    if getattr(result, "refit_epochs", 0):  # the registered model also trained on the validation events
        metrics["refit_epochs"] = float(result.refit_epochs)
    if run_id is None:
        raise TrackingUnavailableError(f"{start_error}; training finished, {_register_hint(checkpoint)}")
    try:
        with_retries(lambda: _finish_run(config, split_dir, result, metrics, run_id), config,
                     "logging final metrics and artifacts", uri)
        version = with_retries(lambda: log_and_register(config, checkpoint, run_id), config,
                               "logging and registering the model", uri)
    except TrackingUnavailableError as exc:
        with contextlib.suppress(Exception):
            mlflow.end_run(status="FAILED")
        raise TrackingUnavailableError(f"{exc}; {_register_hint(checkpoint)}") from exc
    mlflow.end_run(status="FINISHED")
    if epochs.error is not None:
        logger.warning("some epochs were not logged (%s); the final metrics and model were", epochs.error)
    return {
        "run_id": run_id,
        "model_version": str(version.version),
        "registered_model": version.name,
        "metrics": metrics,
        "checkpoint": str(checkpoint),
        "tracking_uri": uri,
        "test_metrics": dict(result.test_metrics),
        "baseline_metrics": {k: dict(v) for k, v in result.baseline_metrics.items()},
        "history": list(result.history),
        "best_epoch": int(getattr(result, "best_epoch", 0)),
        "stopped_early": bool(getattr(result, "stopped_early", False)),
        "device": str(result.device),
        "n_items": int(result.n_items),
    }


def _finish_run(config: Config, split_dir: Path, result: Any, metrics: dict[str, float], run_id: str) -> None:
    mlflow.set_tags({"device": str(result.device), "n_items": str(result.n_items),
                     "checkpoint": str(result.best_checkpoint)})
    mlflow.log_metrics(metrics, run_id=run_id)
    _log_run_artifacts(config, split_dir, list(result.history), result.test_metrics,
                       result.baseline_metrics, run_id)
