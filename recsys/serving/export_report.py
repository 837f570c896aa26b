"""The HTML report of one export: its monitoring numbers and how they moved over the last run dates.

Reads only the monitoring records (``<exports>/monitoring/run_date=*.json``, written by
recsys.serving.monitoring), so it can be rebuilt for any past run date; one self-contained file per
run date beside them. The limits of ``score.monitoring`` are drawn on the time series so that a
drift towards a bound is visible before it fails.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from recsys.config import Config, MonitoringConfig
from recsys.serving.export import partition_dir
from recsys.serving.monitoring import FAIL, WARN, load_series, series_dir
from recsys.tracking.report_html import figure_img, pyplot, table, write_page

SERIES_PANELS = (
    ("coverage", "catalogue coverage@K"),
    ("gini", "Gini of exposure"),
    ("identical_list_share", "share of users with the commonest list"),
    ("top_item_user_share", "share of users shown the top item"),
    ("popular_share", "share served by the popular fallback"),
    ("jaccard_mean", "mean Jaccard@K vs previous export"),
    ("popularity_lift", "mean popularity / catalogue mean"),
    ("unknown_user_share", "unknown users"),
    ("score_p50", "median model score"),
)
COLOURS = {"ok": "C2", WARN: "C1", FAIL: "C3"}


def report_path(exports_dir: Path, run_date: date) -> Path:
    return series_dir(exports_dir) / f"report-{run_date.isoformat()}.html"


def _series_figure(records: list[dict[str, Any]], config: MonitoringConfig) -> str:
    plt = pyplot()
    days = [r["run_date"][5:] for r in records]  # MM-DD keeps the axis readable
    fig, axes = plt.subplots(3, 3, figsize=(13, 8.5))
    x = np.arange(len(records))
    for ax, (key, title) in zip(axes.ravel(), SERIES_PANELS, strict=True):
        values = np.array([np.nan if r["metrics"].get(key) is None else r["metrics"][key] for r in records],
                          dtype=float)
        ax.plot(x, values, color="0.5", linewidth=1)
        ax.scatter(x, values, c=[COLOURS.get(r.get("status"), "C0") for r in records], s=18, zorder=3)
        limit = config.limits.get(key)
        if limit is not None:
            for bound, colour in ((limit.warn_below, "C1"), (limit.warn_above, "C1"),
                                  (limit.fail_below, "C3"), (limit.fail_above, "C3")):
                if bound is not None:
                    ax.axhline(bound, color=colour, linestyle="--", linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(x, days, rotation=60, fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"monitoring over the last {len(records)} run date(s) (green ok, orange warn, red fail; "
                 "dashed: limits)", fontsize=10)
    return figure_img(fig, "monitoring time series")


def _current_figure(record: dict[str, Any]) -> str:
    plt = pyplot()
    dist = record.get("distributions") or {}
    fig, (ax_score, ax_jac, ax_lor) = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in ((ax_score, "score_hist", "model scores"),
                           (ax_jac, "jaccard_hist", "Jaccard@K per user vs previous export")):
        hist = dist.get(key) or {}
        edges, counts = hist.get("edges") or [], hist.get("counts") or []
        if counts:
            ax.stairs(counts, edges, fill=True, alpha=0.7)
        else:
            ax.text(0.5, 0.5, "no previous export" if key == "jaccard_hist" else "no model scores",
                    ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=9)
    lorenz = np.array(dist.get("lorenz") or [[0, 0], [1, 1]], dtype=float)
    ax_lor.plot(lorenz[:, 0], lorenz[:, 1], label="exposure")
    ax_lor.plot([0, 1], [0, 1], color="0.6", linestyle=":", label="equal exposure")
    ax_lor.set(xlabel="share of catalogue (least shown first)", ylabel="share of recommendations")
    ax_lor.set_title(f"Lorenz curve (Gini {record['metrics'].get('gini', 0):.3f})", fontsize=9)
    ax_lor.legend(fontsize=7)
    return figure_img(fig, "score, churn and exposure distributions")


def write_export_report(exports_dir: Path, run_date: date, config: MonitoringConfig,
                        manifest: dict[str, Any] | None = None) -> Path:
    """Write ``<exports>/monitoring/report-<run_date>.html`` from the monitoring records; returns its path."""
    records = load_series(exports_dir, until=run_date, last=config.report_runs)
    current = next((r for r in reversed(records) if r["run_date"] == run_date.isoformat()), None)
    if current is None:
        raise FileNotFoundError(f"no monitoring record for run_date={run_date} under "
                                f"{series_dir(exports_dir)}")
    level = {f["metric"]: f for f in current.get("findings") or []}
    rows, css = [], []
    for key, value in current["metrics"].items():
        finding = level.get(key)
        verdict = f"{finding['level']} ({finding['rule']} {finding['bound']:g})" if finding else ""
        rows.append([key, value, verdict])
        css.append(finding["level"] if finding else "")
    model = (manifest or {}).get("model") or {}
    facts = [["run date", current["run_date"]], ["status", current["status"].upper()],
             ["previous export", current.get("previous_run_date") or "none"],
             ["model", f"{model.get('name', '?')} v{model.get('version', '?')}" if model else "–"],
             ["export", (manifest or {}).get("path") or str(partition_dir(exports_dir, run_date))],
             ["rows", (manifest or {}).get("rows", "–")]]
    top = current.get("distributions", {}).get("top_items") or []
    sections = [
        table(["", ""], facts, ["", current["status"], "", "", "", ""]),
        "<h2>Monitored numbers</h2>" + table(["number", "value", "limit crossed"], rows, css),
        "<h2>Over time</h2>" + _series_figure(records, config),
        "<h2>This export</h2>" + _current_figure(current),
        "<h2>Most shown items</h2>" + table(["item", "users shown"], top),
    ]
    return write_page(report_path(exports_dir, run_date), f"Export report — {current['run_date']}",
                      sections)


def log_export_report(config: Config, run_date: date, report: Path, monitoring: dict[str, Any]) -> str:
    """Record the export's monitoring in MLflow: a ``score`` run with the numbers and the HTML report.

    Returns the run id. The tracking store is optional for scoring, so callers treat a failure as a
    warning (the report stays on disk).
    """
    import mlflow

    from recsys.tracking.store import connect, with_retries

    store = connect(config)
    numbers = {k: float(v) for k, v in (monitoring.get("metrics") or {}).items()
               if isinstance(v, int | float) and not isinstance(v, bool)}

    def log() -> str:
        with mlflow.start_run(experiment_id=store.experiment_id, run_name=f"score-{run_date.isoformat()}",
                              tags={"recsys.kind": "score", "run_date": run_date.isoformat(),
                                    "monitoring.status": str(monitoring.get("status"))}) as run:
            mlflow.log_metrics({f"monitoring.{k}": v for k, v in numbers.items()})
            mlflow.log_artifact(str(report), "report")
            return run.info.run_id

    return with_retries(log, config, "logging the export report", store.uri)
