"""update_flow after the shared pipeline run: the champion's update is registered, gated and reported."""

from __future__ import annotations

from datetime import timedelta

import pytest
from flow_constants import RUN_DATE
from prefect.artifacts import Artifact

pytestmark = pytest.mark.timeout(300)


def test_update_flow_registers_an_updated_challenger_and_gates_it(pipeline_run, ov):
    from flows.update import update_flow

    champion = pipeline_run["train"]["training"]["model_version"]
    out = update_flow(run_date=RUN_DATE + timedelta(days=1), overrides=ov)
    update, decision = out["update"], out["decision"]
    assert str(update["parent_version"]) == str(champion)
    assert update["lineage"].startswith(f"updated from version {champion} with events up to ")
    assert int(update["model_version"]) > int(champion)
    assert decision["challenger_version"] == update["model_version"]
    assert decision["champion_version"] == str(champion)
    report = Artifact.get("update-report")
    assert report is not None and update["lineage"] in report.data
    # the catalogue the generator wrote was ingested on the way (titles for lists and exports)
    assert update["n_items"] >= update["n_new_items"] >= 0
