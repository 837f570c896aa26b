"""Fixtures of the data-stage tests."""

from __future__ import annotations

import pytest
from ingest_helpers import STAGING

from recsys.data.staging import IN_MEMORY_ROWS


@pytest.fixture(params=["memory", "disk"])
def staging(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Ingest runs of the test (via ``ingest_helpers.run``) stage rows in memory, then on disk."""
    monkeypatch.setitem(STAGING, "in_memory_rows", IN_MEMORY_ROWS if request.param == "memory" else -1)
    return request.param
