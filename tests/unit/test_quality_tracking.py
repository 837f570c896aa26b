"""Quality made visible in tracking (real embedded SQLite MLflow): slice metrics, the HTML training report
and the model card of every registered version."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow_fixtures import make_world

from recsys.tracking.runs import tracked_training


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    config = make_world(tmp_path_factory.mktemp("quality") / "data", tracking={"system_metrics": False})
    return config, tracked_training(config)


def test_slices_are_logged_and_the_card_is_on_the_version(tracked):
    config, out = tracked
    client = MlflowClient(tracking_uri=out["tracking_uri"], registry_uri=out["tracking_uri"])
    metrics = client.get_run(out["run_id"]).data.metrics
    # the slice of all targets is the overall metric over every target (none unrankable here)
    assert metrics["test_gru_slice_all_mrr_20"] == pytest.approx(metrics["test_gru_mrr_20"])
    assert any(k.startswith("test_gru_slice_item_head_") for k in metrics)
    slices = out["slices"]
    assert {"all", "item:head", "user:known"} <= set(slices["slices"])
    row = slices["models"]["gru4rec"]["all"]
    assert row["mrr@20_low"] <= row["mrr@20"] <= row["mrr@20_high"] and row["n"] == 60

    version = client.get_model_version(config.tracking.registered_model, out["model_version"])
    assert version.description.startswith(f"# Model card: {config.tracking.registered_model} v")
    for heading in ("## Data", "## Protocol and policy", "## Test metrics", "## Slices", "## Training cost",
                    "## Known limitations", "## Lineage"):
        assert heading in version.description
    local = Path(mlflow.artifacts.download_artifacts(run_id=out["run_id"], artifact_path="model_card",
                                                     tracking_uri=out["tracking_uri"]))
    card = json.loads((local / "model_card.json").read_text())
    assert card["model"]["version"] == out["model_version"] and card["model"]["run_id"] == out["run_id"]
    assert card["metrics"]["test"]["mrr@20"] == pytest.approx(out["test_metrics"]["mrr@20"])
    ci = card["metrics"]["intervals"]["mrr@20"]
    assert ci["low"] <= ci["all_targets"] <= ci["high"]
    assert ci["all_targets"] == pytest.approx(card["metrics"]["test"]["mrr@20"])  # every target ranked here
    assert set(card["baselines"]) == {"item-knn", "most-popular"} and card["training_cost"]["epochs"] == 1
    assert card["data"]["window"] and card["limitations"]
    assert card["lineage"]["seed"] == str(config.train.seed)


def test_training_report_is_self_contained_and_logged(tracked):
    config, out = tracked
    path = Path(out["report_path"])
    text = path.read_text()
    assert path.is_relative_to(config.paths.data_root) and text.startswith("<!DOCTYPE html>")
    for section in ("Test metrics vs baselines", "Slices", "Per-epoch curves", "Popularity of recommended"):
        assert section in text
    assert text.count('src="data:image/png;base64,') == 3  # slices, epochs, popularity
    assert "http://" not in text and "https://" not in text  # nothing fetched from anywhere
    client = MlflowClient(tracking_uri=out["tracking_uri"])
    assert f"report/{path.name}" in {f.path for f in client.list_artifacts(out["run_id"], "report")}


def test_gate_on_real_versions_records_the_interval_and_slices(tracked):
    from mlflow_fixtures import train_checkpoint

    from recsys.tracking.promotion import promote
    from recsys.tracking.runs import register_checkpoint

    config, out = tracked
    first = promote(config)  # the tracked run's version: first champion, nothing to compare per target
    assert first.promoted and first.comparison == {} and first.blocked_slices == []
    version = register_checkpoint(config, train_checkpoint(config, "longer", epochs=4))["model_version"]
    decision = promote(config)
    overall = decision.comparison["overall"]
    assert overall["n"] == 60 and overall["low"] <= overall["mean"] <= overall["high"]
    c, ch = decision.challenger_metrics["mrr@20"], decision.champion_metrics["mrr@20"]
    assert overall["mean"] == pytest.approx(c - ch)  # paired per-target differences average to the gap
    assert {"item:head", "user:known"} <= set(decision.comparison["slices"])
    if c > ch:  # the point gain clears the (zero) margin: the interval and the slices decide
        assert "CI [" in decision.reason
        assert decision.promoted == (overall["low"] > 0 and not decision.blocked_slices)
    registered = MlflowClient(tracking_uri=out["tracking_uri"]).get_model_version(
        config.tracking.registered_model, version)
    assert registered.description.startswith("# Model card")  # `recsys register` versions get one too
    tags = registered.tags
    assert tags["promotion.interval"].startswith(f"{overall['mean']:+.6f}")
    assert tags["promotion.blocked_slices"] == ",".join(decision.blocked_slices)
