"""Export monitoring: look at the lists before anyone else does, and keep the numbers as a time series.

An export can pass every contract check (ids, ranks, no watched items) and still be useless: the same
20 items for everyone, a fallback that swallowed most users, or lists that changed completely overnight.
After every scoring run :func:`monitor_export` measures

- catalogue coverage@K, the Gini coefficient of exposure over the catalogue, the commonest list's share
  and the most shown item's share of the model-served users (concentration);
- the mean training popularity of recommended items, absolute and relative to the catalogue's mean;
- the share of users served by the popular fallback, unknown users and unknown item events;
- the score distribution (quantiles and a histogram);
- churn against the previous run date's export: Jaccard@K of each user's two lists (mean, quantiles,
  histogram);

compares them with ``score.monitoring.limits`` (each number may warn or fail below or above a bound) and
writes one JSON record per run date under ``<exports>/monitoring/`` (the time series that the export
report plots). The record also goes into the export's ``_manifest.json``; a failing export is not
published when ``block_on_fail`` is set, so the previous run date stays the latest complete one.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.config import Limit, MonitoringConfig
from recsys.data.vocab import Vocab
from recsys.schemas import COUNT, ITEM_ID, RANK, SCORE, SOURCE, USER_ID

log = logging.getLogger(__name__)

MONITORING_DIR = "monitoring"
OK, WARN, FAIL = "ok", "warn", "fail"
# Every number a limit may name (score.monitoring.limits keys).
MONITORED = (
    "coverage", "gini", "identical_list_share", "top_item_user_share", "mean_popularity",
    "popularity_lift", "popular_share", "unknown_user_share", "unknown_item_event_share", "jaccard_mean",
    "jaccard_p10", "score_p50", "users_scored", "continuation_share",
)
HIST_BINS = 20


class ExportMonitoringError(ValueError):
    """The export failed a monitoring limit (and ``block_on_fail`` kept it from being published)."""


@dataclass
class MonitoringResult:
    run_date: str
    status: str
    metrics: dict[str, float | None]
    findings: list[dict[str, Any]] = field(default_factory=list)  # {metric, level, value, bound, rule}
    distributions: dict[str, Any] = field(default_factory=dict)
    previous_run_date: str | None = None
    created_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line: the status and every finding."""
        if not self.findings:
            return f"monitoring {self.run_date}: ok"
        parts = [f"{f['level']} {f['metric']}={f['value']:.4g} ({f['rule']} {f['bound']:g})"
                 for f in self.findings]
        return f"monitoring {self.run_date}: {self.status}: " + "; ".join(parts)


def gini(exposure: np.ndarray) -> float:
    """Gini coefficient of non-negative exposure counts (0: every item shown equally, ->1: one item)."""
    x = np.sort(np.asarray(exposure, dtype=np.float64))
    n, total = len(x), x.sum()
    if n == 0 or total <= 0:
        return 0.0
    ranks = np.arange(1, n + 1, dtype=np.float64)
    return float(((2 * ranks - n - 1) * x).sum() / (n * total))


def lorenz_points(exposure: np.ndarray, n_points: int = 21) -> list[list[float]]:
    """[share of items, share of exposure] at ``n_points`` evenly spaced item shares (least shown first)."""
    x = np.sort(np.asarray(exposure, dtype=np.float64))
    if not len(x) or x.sum() <= 0:
        return [[0.0, 0.0], [1.0, 1.0]]
    cum = np.concatenate([[0.0], np.cumsum(x) / x.sum()])
    shares = np.linspace(0, 1, n_points)
    return [[float(s), float(np.interp(s * len(x), np.arange(len(x) + 1), cum))] for s in shares]


def _histogram(values: np.ndarray, bins: int | np.ndarray = HIST_BINS) -> dict[str, list[float]]:
    values = values[np.isfinite(values)]
    if not len(values):
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(values, bins=bins)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def _quantiles(values: np.ndarray, prefix: str) -> dict[str, float | None]:
    values = values[np.isfinite(values)]
    qs = {"p01": 0.01, "p10": 0.1, "p50": 0.5, "p90": 0.9, "p99": 0.99}
    if not len(values):
        return {f"{prefix}_{k}": None for k in qs}
    found = np.quantile(values, list(qs.values()))
    return {f"{prefix}_{k}": float(v) for k, v in zip(qs, found, strict=True)}


def _concentration(model_recs: pl.DataFrame) -> tuple[float | None, float | None]:
    """(share of model users with the commonest list, share of model users shown the most shown item)."""
    n_users = model_recs[USER_ID].n_unique()
    if n_users == 0:
        return None, None
    lists = model_recs.sort(USER_ID, RANK).group_by(USER_ID, maintain_order=True).agg(pl.col(ITEM_ID))
    identical = lists.select(pl.col(ITEM_ID).hash()).to_series().value_counts(sort=True)["count"][0]
    per_item = model_recs.group_by(ITEM_ID).agg(pl.col(USER_ID).n_unique().alias("users"))["users"].max()
    return float(identical / n_users), float(per_item / n_users)


def churn(recs: pl.DataFrame, previous: pl.DataFrame) -> tuple[np.ndarray, int]:
    """Per user in both exports, the Jaccard index of the two recommended item sets; and the user count."""
    now = recs.group_by(USER_ID).agg(pl.col(ITEM_ID).alias("a"))
    before = previous.group_by(USER_ID).agg(pl.col(ITEM_ID).alias("b"))
    both = now.join(before, on=USER_ID, how="inner")
    if not both.height:
        return np.empty(0), 0
    both = both.with_columns(
        pl.col("a").list.set_intersection(pl.col("b")).list.len().alias("inter"),
        pl.col("a").list.set_union(pl.col("b")).list.len().alias("union"),
    )
    values = (both["inter"] / both["union"].clip(lower_bound=1)).cast(pl.Float64).to_numpy()
    return values, both.height


def evaluate_limits(metrics: dict[str, float | None], limits: dict[str, Limit]) -> list[dict[str, Any]]:
    """Findings for every limit crossed (a fail bound wins over a warn bound of the same metric)."""
    findings = []
    for name, limit in limits.items():
        if name not in MONITORED:
            raise ValueError(f"score.monitoring.limits: unknown number {name!r} "
                             f"(known: {', '.join(MONITORED)})")
        value = metrics.get(name)
        if value is None or not np.isfinite(value):
            continue
        for level, rule, bound in ((FAIL, "<", limit.fail_below), (FAIL, ">", limit.fail_above),
                                   (WARN, "<", limit.warn_below), (WARN, ">", limit.warn_above)):
            if bound is not None and (value < bound if rule == "<" else value > bound):
                findings.append({"metric": name, "level": level, "value": float(value), "bound": float(bound),
                                 "rule": rule})
                break
    return findings


def measure(
    recs: pl.DataFrame,
    *,
    catalogue: pl.DataFrame,
    counts: dict[str, Any],
    previous: pl.DataFrame | None,
) -> tuple[dict[str, float | None], dict[str, Any]]:
    """The monitored numbers and distributions of one export.

    ``catalogue`` has ``item_id`` and ``count`` (training events) for every recommendable item;
    ``counts`` are the scorer's counts (users_scored, users_popular, unknown_users, ...).
    """
    n_catalogue = max(catalogue.height, 1)
    exposure_frame = catalogue.select(ITEM_ID, pl.col("count").cast(pl.Float64)).join(
        recs.group_by(ITEM_ID).len("shown"), on=ITEM_ID, how="left",
    ).with_columns(pl.col("shown").fill_null(0))
    exposure = exposure_frame["shown"].to_numpy()
    shown = recs.join(catalogue.select(ITEM_ID, pl.col("count").cast(pl.Float64)), on=ITEM_ID, how="left")
    mean_pop = float(shown["count"].mean()) if shown.height else None
    catalogue_mean = float(catalogue["count"].cast(pl.Float64).mean()) if catalogue.height else None
    model_recs = recs.filter(pl.col(SOURCE) != "popular")  # the lists the model (and its rules) made
    identical, top_item = _concentration(model_recs)
    # the model's own scores: a continuation slot's score is the rule's (above the row's best), not a logit
    scores = recs.filter(pl.col(SOURCE) == "model")[SCORE].cast(pl.Float64).to_numpy()
    users = int(counts.get("users_scored") or recs[USER_ID].n_unique())
    requested = counts.get("users_requested")
    unknown_users = int(counts.get("unknown_users") or 0)
    history_events = int(counts.get("history_events") or 0) + int(counts.get("unknown_item_events") or 0)
    metrics: dict[str, float | None] = {
        "users_scored": float(users),
        "users_model": float(model_recs[USER_ID].n_unique()),
        "coverage": float(recs[ITEM_ID].n_unique() / n_catalogue),
        "gini": gini(exposure),
        "identical_list_share": identical,
        "top_item_user_share": top_item,
        "mean_popularity": mean_pop,
        "popularity_lift": (mean_pop / catalogue_mean) if mean_pop is not None and catalogue_mean else None,
        "popular_share": float(counts.get("users_popular") or 0) / users if users else None,
        # rows the series-continuation rule placed: drops to 0 when the catalogue's series structure is lost
        "continuation_share": (float((model_recs[SOURCE] == "continuation").sum()) / model_recs.height
                               if model_recs.height else None),
        "unknown_user_share": unknown_users / max(int(requested or users), 1),
        "unknown_item_event_share": (int(counts.get("unknown_item_events") or 0) / history_events
                                     if history_events else 0.0),
        **_quantiles(scores, "score"),
    }
    distributions: dict[str, Any] = {
        "score_hist": _histogram(scores),
        "lorenz": lorenz_points(exposure),
        "top_items": (exposure_frame.sort("shown", descending=True).head(10)
                      .select(pl.col(ITEM_ID).cast(pl.String), "shown").rows()),
    }
    if previous is not None:
        values, n_both = churn(recs, previous)
        metrics["jaccard_users"] = float(n_both)
        metrics["jaccard_mean"] = float(values.mean()) if n_both else None
        metrics.update(_quantiles(values, "jaccard"))
        distributions["jaccard_hist"] = _histogram(values, np.linspace(0, 1, 11))
    else:
        metrics["jaccard_mean"] = None
    return metrics, distributions


def series_dir(exports_dir: Path) -> Path:
    return Path(exports_dir) / MONITORING_DIR


def record_path(exports_dir: Path, run_date: date) -> Path:
    return series_dir(exports_dir) / f"run_date={run_date.isoformat()}.json"


def write_record(exports_dir: Path, result: MonitoringResult) -> Path:
    """One JSON record per run date (atomic replace: a re-run of a date replaces its record)."""
    path = record_path(exports_dir, date.fromisoformat(result.run_date))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result.to_dict(), indent=2, default=str))
    os.replace(tmp, path)
    return path


def load_series(exports_dir: Path, until: date | None = None, last: int = 30) -> list[dict[str, Any]]:
    """The ``last`` monitoring records up to ``until`` (inclusive), oldest first; unreadable ones skipped."""
    records = []
    for path in sorted(series_dir(exports_dir).glob("run_date=*.json")):
        day = path.stem.removeprefix("run_date=")
        if until is not None and day > until.isoformat():
            continue
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            log.warning("skipping unreadable monitoring record %s: %s", path, exc)
    return records[-last:]


def previous_export(exports_dir: Path, run_date: date) -> tuple[pl.DataFrame | None, str | None]:
    """The latest complete export before ``run_date`` (user_id, item_id) and its run date, if any."""
    from recsys.serving.export import complete_partitions

    day = run_date.isoformat()
    older = [p for p in complete_partitions(exports_dir) if p.name.removeprefix("run_date=") < day]
    if not older:
        return None, None
    latest = older[-1]
    frame = pl.read_parquet(sorted(latest.glob("*.parquet")), columns=[USER_ID, ITEM_ID])
    return frame, latest.name.removeprefix("run_date=")


def monitor_export(
    recs: pl.DataFrame,
    *,
    config: MonitoringConfig,
    exports_dir: Path,
    run_date: date,
    catalogue: pl.DataFrame,
    counts: dict[str, Any],
) -> MonitoringResult:
    """Measure an export before it is published, judge it against the limits, record the time series.

    The record is written whatever the verdict (a blocked export is exactly what a team must see).
    """
    previous, previous_date = previous_export(exports_dir, run_date)
    if previous is not None and previous[USER_ID].dtype != recs[USER_ID].dtype:
        previous = previous.with_columns(pl.col(USER_ID).cast(recs[USER_ID].dtype, strict=False))
    if previous is not None and previous[ITEM_ID].dtype != recs[ITEM_ID].dtype:
        previous = previous.with_columns(pl.col(ITEM_ID).cast(recs[ITEM_ID].dtype, strict=False))
    metrics, distributions = measure(recs, catalogue=catalogue, counts=counts, previous=previous)
    if (metrics.get("users_model") or 0) < config.min_users:  # shares of a handful of lists mean nothing
        metrics["identical_list_share"] = metrics["top_item_user_share"] = None
    findings = evaluate_limits(metrics, dict(config.limits))
    if (metrics.get("users_scored") or 0) < config.min_users:  # a handful of users: shares mean nothing
        log.info("monitoring %s: %s users scored (< min_users %d), limits not applied", run_date,
                 metrics.get("users_scored"), config.min_users)
        findings = []
    status = FAIL if any(f["level"] == FAIL for f in findings) else WARN if findings else OK
    result = MonitoringResult(run_date=run_date.isoformat(), status=status, metrics=metrics,
                              findings=findings,
                              distributions=distributions, previous_run_date=previous_date,
                              created_at=datetime.now(UTC).isoformat(timespec="seconds"))
    write_record(exports_dir, result)
    (log.warning if findings else log.info)(result.summary())
    return result


def check_publishable(result: MonitoringResult, config: MonitoringConfig) -> None:
    """Raise :class:`ExportMonitoringError` for a failing export when ``block_on_fail`` is set."""
    if result.status == FAIL and config.block_on_fail:
        raise ExportMonitoringError(f"export for run_date={result.run_date} not published: "
                                    f"{result.summary()}")


def monitor_scored(
    recs: pl.DataFrame,
    vocab: Vocab,
    excluded_idx: np.ndarray,
    counts: dict[str, Any],
    *,
    config: MonitoringConfig,
    exports_dir: Path,
    run_date: date,
) -> dict[str, Any] | None:
    """The scorer's entry point: the catalogue is the model's vocabulary less the withdrawn items.

    Returns the record for ``_manifest.json`` (None when monitoring is off); raises
    :class:`ExportMonitoringError` before publication for a failing export (``block_on_fail``).
    """
    if not config.enabled:
        return None
    keep = np.ones(len(vocab), dtype=bool)
    keep[np.asarray(excluded_idx, dtype=np.int64)] = False
    catalogue = vocab.frame.filter(pl.Series(keep)).select(ITEM_ID, COUNT)
    result = monitor_export(recs, config=config, exports_dir=exports_dir, run_date=run_date,
                            catalogue=catalogue, counts=counts)
    check_publishable(result, config)
    return result.to_dict()
