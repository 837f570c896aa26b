"""The HTML report of one training run: what a person opens instead of reading 150 MLflow metrics.

Sections: test metrics beside the baselines, per-slice metrics with bootstrap intervals (table and
chart), the per-epoch curves, and the popularity of the recommended items against the catalogue's.
Built from plain data (the training summary and the split's vocabulary), written as one
self-contained file (recsys.tracking.report_html).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recsys.tracking.report_html import esc, figure_img, png_img, pyplot, table, write_page

TABLE_METRICS = ("recall@10", "recall@20", "mrr@20", "ndcg@20", "coverage@20", "popularity@20")
SLICE_METRIC = "mrr@20"


def _metrics_section(models: Mapping[str, Mapping[str, Any]]) -> str:
    rows = [[name, *(m.get(k) for k in TABLE_METRICS)] for name, m in models.items()]
    first = next(iter(models.values()), {})
    note = (f"<p class=note>{int(first.get('n_queries', 0)):,} ranked test targets, "
            f"{int(first.get('unseen_target', 0)):,} unseen in training, {int(first.get('no_history', 0)):,} "
            "without known history; every target ranked against the full catalogue.</p>")
    return "<h2>Test metrics vs baselines</h2>" + table(["model", *TABLE_METRICS], rows) + note


def _slices_section(slices: Mapping[str, Any]) -> str:
    models: Mapping[str, Mapping[str, Mapping[str, Any]]] = slices.get("models") or {}
    if not models:
        return "<h2>Slices</h2><p>No slice metrics (test evaluation skipped).</p>"
    names = list(slices.get("slices") or next(iter(models.values())).keys())
    level = f"{float(slices.get('confidence', 0.95)):.0%}"
    header = ["slice", "targets"]
    for model in models:
        header += [f"{model} R@20", f"{model} MRR@20 [{level} CI]", f"{model} NDCG@20"]
    rows = []
    for name in names:
        first = next(iter(models.values())).get(name, {})
        row: list[Any] = [name, first.get("n")]
        for report in models.values():
            cell = report.get(name, {})
            interval = (f"{cell.get(SLICE_METRIC, float('nan')):.4f} "
                        f"[{cell.get(SLICE_METRIC + '_low', float('nan')):.4f}, "
                        f"{cell.get(SLICE_METRIC + '_high', float('nan')):.4f}]") if cell else "–"
            row += [cell.get("recall@20"), interval, cell.get("ndcg@20")]
        rows.append(row)
    return ("<h2>Slices (test targets)</h2><p class=note>Targets a model cannot rank (new items, no known "
            "history) count as misses. Intervals: percentile bootstrap over targets.</p>"
            + table(header, rows) + _slices_chart(models, names, level))


def _slices_chart(models: Mapping[str, Mapping[str, Mapping[str, Any]]], names: Sequence[str],
                  level: str) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(8.0, 0.75 * len(names) * max(1, len(models)) / 2 + 4), 4.2))
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(names))
    for i, (model, report) in enumerate(models.items()):
        mean = np.array([report.get(n, {}).get(SLICE_METRIC, np.nan) for n in names], dtype=float)
        low = np.array([report.get(n, {}).get(SLICE_METRIC + "_low", np.nan) for n in names], dtype=float)
        high = np.array([report.get(n, {}).get(SLICE_METRIC + "_high", np.nan) for n in names], dtype=float)
        err = np.nan_to_num(np.vstack([mean - low, high - mean]), nan=0.0).clip(min=0)
        ax.bar(x + (i - (len(models) - 1) / 2) * width, np.nan_to_num(mean), width, yerr=err, capsize=2,
               label=model)
    ax.set_xticks(x, names, rotation=35, ha="right")
    ax.set(ylabel=SLICE_METRIC, title=f"{SLICE_METRIC} per slice ({level} intervals)")
    ax.legend(fontsize=8)
    return figure_img(fig, f"{SLICE_METRIC} per slice")


def _epochs_section(history: Sequence[Mapping[str, Any]], workdir: Path) -> str:
    from recsys.tracking.run_report import epoch_rows, write_epoch_plot

    if not history:
        return "<h2>Per-epoch curves</h2><p>No epochs recorded.</p>"
    png = write_epoch_plot(history, workdir / "epochs.png")
    rows = epoch_rows(history)
    keys = [k for k in ("epoch", "train_loss", "valid_recall_20", "valid_mrr_20", "epoch_seconds",
                        "events_per_second") if any(k in r for r in rows)]
    return ("<h2>Per-epoch curves</h2>" + png_img(png, "train loss and validation metrics per epoch")
            + table(keys, [[int(r[k]) if k == "epoch" and k in r else r.get(k) for k in keys] for r in rows]))


def _popularity_section(models: Mapping[str, Mapping[str, Any]], item_counts: np.ndarray | None) -> str:
    """Mean training popularity of each model's recommended items, against the catalogue's distribution."""
    if item_counts is None or not len(item_counts):
        return ""
    counts = np.sort(np.asarray(item_counts, dtype=float))[::-1]
    item_mean, event_mean = counts.mean(), float((counts**2).sum() / max(counts.sum(), 1))
    plt = pyplot()
    fig, (ax_cat, ax_bar) = plt.subplots(1, 2, figsize=(11, 4))
    ax_cat.plot(np.arange(1, len(counts) + 1), np.maximum(counts, 0.5))
    ax_cat.set(xscale="log", yscale="log", xlabel="item rank by training events", ylabel="training events",
               title="catalogue popularity (long tail)")
    names = [n for n, m in models.items() if "popularity@20" in m]
    values = [float(models[n]["popularity@20"]) for n in names]
    for name, value in zip(names, values, strict=True):
        ax_cat.axhline(value, linestyle="--", linewidth=1, label=f"{name} mean of recommended")
    if names:
        ax_cat.legend(fontsize=7)
    ax_bar.barh(names + ["catalogue (per item)", "catalogue (per event)"], values + [item_mean, event_mean],
                color=["C0"] * len(names) + ["0.6", "0.4"])
    ax_bar.set(xlabel="mean training events of the item", title="popularity of recommended items @20")
    rows = [[n, v, v / item_mean if item_mean else None] for n, v in zip(names, values, strict=True)]
    rows += [["catalogue (per item)", item_mean, 1.0], ["catalogue (per event)", event_mean,
                                                         event_mean / item_mean if item_mean else None]]
    return ("<h2>Popularity of recommended items vs catalogue</h2>" + figure_img(fig, "popularity")
            + table(["", "mean training events", "x catalogue item mean"], rows))


def write_training_report(
    path: Path,
    *,
    title: str,
    facts: Mapping[str, Any],
    test_metrics: Mapping[str, Any],
    baseline_metrics: Mapping[str, Mapping[str, Any]],
    slices: Mapping[str, Any] | None,
    history: Sequence[Mapping[str, Any]],
    item_counts: np.ndarray | None,
) -> Path:
    """Write the report to ``path``; ``facts`` (run id, version, data window...) head the page."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    models = {"gru4rec": dict(test_metrics), **{k: dict(v) for k, v in baseline_metrics.items()}}
    facts_html = "<table>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>"
                                     for k, v in facts.items()) + "</table>"
    sections = [
        facts_html,
        _metrics_section(models) if test_metrics else "<h2>Test metrics</h2><p>Not evaluated.</p>",
        _slices_section(slices or {}),
        _epochs_section(history, path.parent),
        _popularity_section(models, item_counts),
    ]
    (path.parent / "epochs.png").unlink(missing_ok=True)
    return write_page(path, title, sections)
