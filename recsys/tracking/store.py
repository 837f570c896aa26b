"""MLflow tracking store: where runs go, and calls to it that retry with a bound.

The default store is embedded (a SQLite file and an artifact folder under ``paths.data_root/mlflow``) so
nothing has to be started by hand; ``tracking.tracking_uri`` or ``$MLFLOW_TRACKING_URI`` point at a
real server instead. Every call to the store goes through :func:`with_retries`: transient failures are
retried with exponential backoff for ``tracking.retry_window_seconds`` in all (long enough to outlast a server
restart), then a clear error names the store. MLflow's own HTTP retries are off so that window is the
only one. Training never depends on the store: if it is down, the checkpoint is kept and the error says
how to register it later. A tracking URI is only ever shown :func:`~recsys.config.redact`-ed.
"""

from __future__ import annotations

import os

# Before mlflow is imported anywhere through this module: no telemetry, and HTTP calls that give up
# quickly (our own retries below are the bounded ones). Values set by the user win.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow prints a "View run <url>" line built from the tracking URI, credentials included: we log our own,
# redacted one instead.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

import contextlib  # noqa: E402
import fcntl  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import TypeVar  # noqa: E402

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from recsys.config import Config, redact  # noqa: E402

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
    line = redact((str(exc).splitlines() or [type(exc).__name__])[0])
    return line if len(line) <= limit else line[: limit - 1] + "…"


def with_retries(fn: Callable[[], T], config: Config, what: str, uri: str | None = None) -> T:
    """Call ``fn``; retry transient errors with doubling backoff for ``tracking.retry_window_seconds``.

    The final failure is a :class:`TrackingUnavailableError` naming the (redacted) URI and the last error.
    """
    shown = redact(uri or resolve_tracking_uri(config))
    settings = config.tracking
    deadline = time.monotonic() + settings.retry_window_seconds
    delay = settings.retry_backoff_seconds
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise TrackingUnavailableError(
                    f"MLflow tracking store {shown} is unreachable ({what} failed {attempt} time(s) over "
                    f"{settings.retry_window_seconds:g} s); last error: {_short(exc)}"
                ) from exc
            wait = min(delay, left)
            logger.warning("%s against %s failed (attempt %d, %.0f s left), retrying in %.1f s: %s",
                           what, shown, attempt, left, wait, _short(exc))
            time.sleep(wait)
            delay = min(delay * 2, settings.retry_max_backoff_seconds)


def try_once(fn: Callable[[], T]) -> tuple[T | None, BaseException | None]:
    """One attempt without waiting: ``(result, None)``, or ``(None, error)`` for a transient failure."""
    try:
        return fn(), None
    except Exception as exc:
        if not is_transient(exc):
            raise
        return None, exc


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
