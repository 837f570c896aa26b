"""Prefect flows: thin, typed wrappers that chain the ``recsys`` library's stages.

Importing this package (before Prefect itself) asks Prefect to forward the library's stdlib
``recsys`` logger to the flow-run logs in the UI, and keeps Prefect local and quiet by default.
"""

from __future__ import annotations

import os


def _append_env_list(name: str, value: str) -> None:
    current = [v.strip() for v in os.environ.get(name, "").split(",") if v.strip()]
    if value not in current:
        os.environ[name] = ",".join([*current, value])


_append_env_list("PREFECT_LOGGING_EXTRA_LOGGERS", "recsys")
# The library also logs outside flow runs (CLI commands, task.fn() calls): that is normal, not a warning.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bars in flow logs


def use_local_prefect(prefect_home: os.PathLike[str] | str) -> None:
    """Keep Prefect's state (ephemeral API database, results) under the project's data root.

    Must run before Prefect is imported; an explicit ``PREFECT_HOME`` or ``PREFECT_API_URL`` (a real
    server) in the environment wins.
    """
    from pathlib import Path

    home = Path(prefect_home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(home))
