"""Export monitoring on real exports written by the real scorer: the numbers, the limits, churn against the
previous run date, the time series, and a degenerate export that must fail and stay unpublished."""

from __future__ import annotations

import json
from datetime import timedelta

import numpy as np
import polars as pl
import pytest
import torch
from score_fixtures import RUN_DATE, make_world

from recsys.config import MonitoringConfig
from recsys.model.checkpoint import load_checkpoint, save_checkpoint
from recsys.model.gru4rec import GRU4Rec
from recsys.schemas import ITEM_ID, MANIFEST_FILE, RANK, SCORE, SOURCE, USER_ID
from recsys.serving.export import complete_partitions, partition_dir
from recsys.serving.export_report import write_export_report
from recsys.serving.monitoring import (
    FAIL,
    OK,
    ExportMonitoringError,
    check_publishable,
    gini,
    load_series,
    monitor_export,
)
from recsys.serving.score import score_users


def _recs(lists: dict[int, list[int]], source: str = "model") -> pl.DataFrame:
    rows = [(u, r + 1, item, float(20 - r), source)
            for u, items in lists.items() for r, item in enumerate(items)]
    return pl.DataFrame(rows, schema={USER_ID: pl.Int64, RANK: pl.Int16, ITEM_ID: pl.Int64, SCORE: pl.Float32,
                                      SOURCE: pl.String}, orient="row")


CATALOGUE = pl.DataFrame({ITEM_ID: np.arange(500, dtype=np.int64), "count": np.arange(500, 0, -1)})


def test_gini_bounds():
    assert gini(np.ones(10)) == pytest.approx(0.0)
    assert gini(np.r_[np.zeros(99), 1.0]) == pytest.approx(0.99)


def test_same_twenty_items_for_everyone_fails(tmp_path):
    degenerate = _recs({u: list(range(20)) for u in range(300)})
    result = monitor_export(degenerate, config=MonitoringConfig(), exports_dir=tmp_path, run_date=RUN_DATE,
                            catalogue=CATALOGUE, counts={"users_scored": 300, "users_popular": 0})
    assert result.status == FAIL
    levels = {f["metric"]: f["level"] for f in result.findings}
    assert levels["identical_list_share"] == levels["top_item_user_share"] == FAIL
    assert levels["gini"] == levels["coverage"] == "warn"  # 1 - 20/500 = 0.96: concentrated, not yet failing
    assert result.metrics["identical_list_share"] == 1.0 and result.metrics["coverage"] == 20 / 500
    with pytest.raises(ExportMonitoringError, match="identical_list_share"):
        check_publishable(result, MonitoringConfig())
    check_publishable(result, MonitoringConfig(block_on_fail=False))  # warn-only setting lets it through
    assert load_series(tmp_path)[0]["status"] == FAIL  # the failure is on record


def test_varied_lists_pass_and_churn_is_measured(tmp_path):
    rng = np.random.default_rng(0)
    lists = {u: rng.choice(500, 20, replace=False).tolist() for u in range(300)}
    result = monitor_export(_recs(lists), config=MonitoringConfig(), exports_dir=tmp_path, run_date=RUN_DATE,
                            catalogue=CATALOGUE, counts={"users_scored": 300, "users_popular": 0})
    assert result.status == OK and result.metrics["jaccard_mean"] is None  # no previous export yet
    assert 0 < result.metrics["gini"] < 0.9 and result.metrics["coverage"] > 0.9


def test_scorer_writes_monitoring_and_churn_into_the_manifest(tmp_path):
    world = make_world(tmp_path, score={"monitoring": {"min_users": 1, "limits": {}}})
    first = score_users(world.config, model_uri=str(world.checkpoint), run_date=RUN_DATE - timedelta(days=1))
    assert first["monitoring"]["metrics"]["jaccard_mean"] is None
    second = score_users(world.config, model_uri=str(world.checkpoint), run_date=RUN_DATE)
    on_disk = json.loads((partition_dir(world.exports_dir, RUN_DATE) / MANIFEST_FILE).read_text())
    mon = on_disk["monitoring"]
    assert mon == json.loads(json.dumps(second["monitoring"]))
    assert mon["previous_run_date"] == (RUN_DATE - timedelta(days=1)).isoformat()
    assert 0.0 <= mon["metrics"]["jaccard_mean"] <= 1.0 and mon["metrics"]["jaccard_users"] >= 1
    assert mon["metrics"]["popular_share"] == pytest.approx(on_disk["counts"]["users_popular"] / 6)
    assert [r["run_date"] for r in load_series(world.exports_dir)] == [
        (RUN_DATE - timedelta(days=1)).isoformat(), RUN_DATE.isoformat()]
    report = write_export_report(world.exports_dir, RUN_DATE, world.config.score.monitoring, on_disk)
    text = report.read_text()
    assert text.count('src="data:image/png;base64,') == 2 and "Over time" in text


def test_degenerate_model_export_fails_and_is_not_published(tmp_path):
    """A model that scores every item the same recommends one list to everyone: refused, the previous
    run date's export stays the latest complete one."""
    world = make_world(tmp_path, score={"monitoring": {"min_users": 1}}, exclude="none")
    yesterday = RUN_DATE - timedelta(days=1)
    good = world.config.model_copy(deep=True)
    good.score.monitoring.limits = {}
    score_users(good, model_uri=str(world.checkpoint), run_date=yesterday)
    ckpt = load_checkpoint(world.checkpoint)
    flat = GRU4Rec(ckpt.n_items, ckpt.config.model)
    flat.load_state_dict({k: torch.zeros_like(v) if k.startswith("item_") else v
                          for k, v in ckpt.model_state.items()})
    constant = save_checkpoint(tmp_path / "constant.pt", model=flat, optimizer=None, config=ckpt.config,
                               vocab=ckpt.vocab, epoch=0, metrics={})
    with pytest.raises(ExportMonitoringError, match="identical_list_share"):
        score_users(world.config, model_uri=str(constant), run_date=RUN_DATE)
    assert [p.name for p in complete_partitions(world.exports_dir)] == [f"run_date={yesterday.isoformat()}"]
    assert load_series(world.exports_dir)[-1]["status"] == FAIL
