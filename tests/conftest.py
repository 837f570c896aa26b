"""Shared test set-up: every test writes under its own temp dir and never reaches the network."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.pop("RECSYS_PROFILE", None)  # tests choose their settings themselves


@pytest.fixture()
def data_root(tmp_path, monkeypatch):
    """A fresh data root for the pipeline, also exported as RECSYS_DATA_ROOT."""
    root = tmp_path / "data"
    monkeypatch.setenv("RECSYS_DATA_ROOT", str(root))
    return root
