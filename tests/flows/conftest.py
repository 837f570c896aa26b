"""Flow tests: one Prefect test harness and one tiny end-to-end pipeline run per session.

The pipeline run is shared (it is what most tests inspect) so that the whole directory stays within
its ~150 s share on 2 cores: ~20 s harness start-up, ~40 s pipeline, the rest re-runs and scoring.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flow_constants import RUN_DATE, TINY

import flows  # noqa: F401 - sets Prefect's environment (extra loggers, analytics off) before Prefect loads


@pytest.fixture(scope="package")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="package")
def flow_root(tmp_path_factory) -> Path:
    """The data root of the flow tests (given to the flows as an override, not via the environment)."""
    return tmp_path_factory.mktemp("flows") / "data"


@pytest.fixture(scope="package")
def ov(flow_root) -> list[str]:
    """Config overrides every flow test passes: tiny settings and the package's data root."""
    return [*TINY, f"paths.data_root={flow_root}"]


@pytest.fixture(scope="package")
def pipeline_run(harness, ov) -> dict:
    """pipeline_flow end to end on tiny synthetic data (generate -> ... -> score)."""
    from flows.pipeline import pipeline_flow

    return pipeline_flow(run_date=RUN_DATE, overrides=ov)
