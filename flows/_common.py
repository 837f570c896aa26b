"""Plumbing shared by the flows: config loading, the I/O retry policy, log forwarding, run dates.

Nothing here decides anything about recommendations; it only adapts the ``recsys`` library to
Prefect (which the library itself never imports).
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import hashlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TypeVar

from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from prefect.tasks import exponential_backoff

from recsys.config import Config, config_to_yaml, load_config
from recsys.data.errors import IngestError

T = TypeVar("T", bound=Task)

LIBRARY_LOGGER = "recsys"
SLOT_FILE = ".pipeline.lock"
# Slots held by this call tree (a subflow inherits its parent's, so the pipeline's train flow re-enters).
_HELD_SLOTS: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("recsys_slots",
                                                                            default=frozenset())

# Errors that a retry cannot fix: a bad config or bad data (ValueError covers ConfigError and pydantic's
# ValidationError; IngestError is input the ingest refuses), a programming error, or running out of
# memory. Everything else raised by an I/O task (OSError, timeouts, an MLflow server that is
# restarting) is worth another attempt.
NON_RETRYABLE: tuple[type[BaseException], ...] = (ValueError, TypeError, KeyError, MemoryError, IngestError)


def forward_library_logs() -> None:
    """Send the library's stdlib ``recsys`` logger to the Prefect UI as well as the console.

    Equivalent to ``PREFECT_LOGGING_EXTRA_LOGGERS=recsys`` (flows/__init__.py sets that before Prefect
    is imported); doing it here too covers a process that imported Prefect first.
    """
    lib = logging.getLogger(LIBRARY_LOGGER)
    for handler in logging.getLogger("prefect.extra").handlers:
        if handler not in lib.handlers:
            lib.addHandler(handler)
    if lib.level == logging.NOTSET:
        lib.setLevel(logging.INFO)


def flow_config(overrides: list[str] | None) -> Config:
    """The run's configuration: ``conf/*.yaml`` plus the flow's ``overrides`` (``section.key=value``)."""
    return load_config(None, list(overrides or []))


def resolve_run_date(run_date: date | None) -> date:
    """The logical date of a run: the given one (backfills, re-runs) or today in UTC."""
    return run_date if run_date is not None else datetime.now(UTC).date()


def retry_io_errors(task: Task, task_run: TaskRun, state: State) -> bool:
    """``retry_condition_fn`` for I/O tasks: retry transient failures, never deterministic ones."""
    try:
        state.result(raise_on_failure=True)
    except NON_RETRYABLE:
        return False
    except Exception:  # noqa: BLE001 - anything else is presumed transient (disk, network, server)
        return True
    return False


def io_task(task: T, config: Config) -> T:
    """``task`` with the configured retries and exponential backoff (I/O tasks only, never training)."""
    orch = config.orchestrate
    return task.with_options(
        retries=orch.io_retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=orch.io_retry_delay_seconds),
        retry_condition_fn=retry_io_errors,
    )


def config_fingerprint(config: Config, *files: Path, extra: str = "") -> str:
    """Hash of the resolved config, the given input files' bytes and ``extra`` (what a result depends on)."""
    digest = hashlib.sha256(config_to_yaml(config).encode() + extra.encode())
    for file in files:
        digest.update(str(file).encode())
        digest.update(file.read_bytes() if file.is_file() else b"<missing>")
    return digest.hexdigest()[:16]


def as_plain(value: Any) -> Any:
    """Dataclasses / paths / dates -> JSON-friendly dicts and strings, for flow results and artifacts."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if hasattr(value, "to_dict"):
            return as_plain(value.to_dict())
        return as_plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): as_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_plain(v) for v in value]
    if isinstance(value, Path | date):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalar -> int/float
        return value.item()
    return value


def fmt(value: Any) -> str:
    """Short human formatting for metric tables."""
    if isinstance(value, float):
        return f"{value:.4f}"
    if value is None:
        return "–"
    return str(value)


@contextlib.contextmanager
def data_root_slot(config: Config, what: str, poll_seconds: float = 2.0) -> Iterator[None]:
    """One run at a time per data root for the stages that rewrite its shared state (sessions, split,
    checkpoints, the champion): a second pipeline or training waits here, it does not fail.

    Why a lock and not isolation: every stage reads the previous stage's output at a fixed path under
    the data root (DESIGN.md), so two run dates at once would overwrite each other's split mid-training;
    serialising them keeps one consistent world and costs only waiting. A file lock (not a Prefect
    concurrency limit) because it protects the files themselves, whoever runs them: ``recsys serve``,
    work-pool workers on hosts sharing the volume, or plain ``flow()`` calls. Re-entrant within a call
    tree (the pipeline's train subflow). The lock file names its holder for the waiting run's log.
    """
    path = (config.paths.data_root / SLOT_FILE).resolve()
    held = _HELD_SLOTS.get()
    if str(path) in held:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    log = logging.getLogger(f"{LIBRARY_LOGGER}.slot")
    with path.open("a+") as handle:
        waited = 0.0
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if waited == 0.0:
                    handle.seek(0)
                    log.info("%s waits for the data root %s, in use by: %s", what, config.paths.data_root,
                             handle.read().strip() or "another run")
                time.sleep(poll_seconds)
                waited += poll_seconds
        if waited:
            log.info("%s got the data root after %.0f s", what, waited)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{what} (pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{datetime.now(UTC).isoformat(timespec='seconds')})\n")
        handle.flush()
        token = _HELD_SLOTS.set(held | {str(path)})
        try:
            yield
        finally:
            _HELD_SLOTS.reset(token)
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
