"""The promotion gate with uncertainty and slices, on constructed per-target ranks (pure numpy, no store)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recsys.config import load_config
from recsys.tracking.promotion import build_evidence, decide
from recsys.training.significance import bootstrap_means
from recsys.training.slices import TargetTable, per_target, popularity_buckets

T = 2000
POPULAR = {"mrr@20": 0.01, "n_queries": T}


def _table(film: np.ndarray) -> TargetTable:
    return TargetTable(Path("test.parquet"), np.arange(T), np.full(T, 3),
                       {"kind:film": film, "kind:series": ~film})


def _metrics(ranks: np.ndarray) -> dict[str, float]:
    return {"mrr@20": float(per_target(ranks, "mrr").mean()), "n_queries": T}


def _gate(config, table, challenger, champion):
    evidence = build_evidence(config, table, challenger, champion)
    cfg = config.promote
    blocked = evidence.blocking(cfg.min_slice_targets, cfg.slice_tolerance, cfg.slice_tolerances)
    promoted, reason = decide(cfg.metric, cfg.min_improvement, _metrics(challenger), POPULAR,
                              _metrics(champion), "1", evidence, blocked)
    return promoted, reason, blocked, evidence


def test_wins_overall_but_loses_a_slice_beyond_tolerance_is_refused():
    config = load_config(overrides=["promote.min_slice_targets=100"])
    film = np.zeros(T, dtype=bool)
    film[:400] = True
    champion = np.where(film, 1, 3)  # films at rank 1, series at rank 3
    challenger = np.where(film, 0, 1)  # films never ranked, series at rank 1: a big overall win
    promoted, reason, blocked, evidence = _gate(config, _table(film), challenger, champion)
    assert evidence.overall.low > 0  # the overall gain is real...
    assert not promoted and blocked == ["kind:film"]  # ...but one slice pays for it
    assert "blocked by slices" in reason and "kind:film" in reason and "kind:series" not in reason.split(
        "blocked by")[1]
    # a tolerance above the drop lets it through; so does a slice below the size that counts
    loose = load_config(overrides=["promote.min_slice_targets=100",
                                   'promote.slice_tolerances={"kind:film": 1.5}'])
    assert _gate(loose, _table(film), challenger, champion)[0]
    small = load_config(overrides=["promote.min_slice_targets=401"])
    assert _gate(small, _table(film), challenger, champion)[0]


def test_gain_inside_the_interval_is_refused_and_a_clear_gain_promoted():
    config = load_config()
    rng = np.random.default_rng(3)
    champion = rng.integers(1, 40, T)
    challenger = champion.copy()
    improved = rng.choice(T, 60, replace=False)
    challenger[improved] = np.maximum(challenger[improved] - 1, 1)  # a few targets one rank better
    worse = rng.choice(np.setdiff1d(np.arange(T), improved), 50, replace=False)
    challenger[worse] += 1
    film = rng.random(T) < 0.3
    promoted, reason, blocked, evidence = _gate(config, _table(film), challenger, champion)
    assert evidence.overall.mean > 0 and evidence.overall.low <= 0 < evidence.overall.high
    assert not promoted and blocked == [] and "not significant" in reason and "95% CI" in reason
    clear = np.maximum(champion // 2, 1)  # every target ranked about twice as high
    promoted, reason, blocked, _ = _gate(config, _table(film), clear, champion)
    assert promoted and blocked == [] and "no slice regresses" in reason


def test_margin_must_be_cleared_by_the_lower_bound():
    config = load_config(overrides=["promote.min_improvement=0.32"])
    champion = np.full(T, 4)
    challenger = np.where(np.arange(T) % 3 == 0, 2, 4)  # +1/12 MRR per target on a third: ~+33 % point gain
    film = np.zeros(T, dtype=bool)
    promoted, reason, _, evidence = _gate(config, _table(film), challenger, champion)
    assert _metrics(challenger)["mrr@20"] > 1.32 * _metrics(champion)["mrr@20"]  # the point gain clears it
    assert evidence.overall.low < 0.32 * _metrics(champion)["mrr@20"]  # the interval does not
    assert not promoted and "not significantly above the margin" in reason


def test_bootstrap_interval_covers_the_mean_and_is_deterministic():
    values = np.random.default_rng(0).normal(1.0, 2.0, 5000)
    a = bootstrap_means(values, {"half": np.arange(5000) < 2500}, seed=1)
    b = bootstrap_means(values, {"half": np.arange(5000) < 2500}, seed=1)
    assert a == b
    assert a["all"].low < values.mean() < a["all"].high
    assert a["all"].high - a["all"].low == pytest.approx(2 * 1.96 * 2.0 / np.sqrt(5000), rel=0.15)
    assert a["half"].n == 2500 and a["half"].high - a["half"].low > a["all"].high - a["all"].low


def test_popularity_buckets_by_share_of_events():
    counts = np.array([50, 20, 10, 10, 5, 5])  # 100 events
    assert popularity_buckets(counts, 0.5, 0.8).tolist() == [0, 1, 1, 2, 2, 2]
