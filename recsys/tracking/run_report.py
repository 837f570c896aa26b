"""Human-readable run artifacts: a metrics-per-epoch plot and metric tables.

They are written as files so the same content is logged to MLflow and can be attached elsewhere (Prefect
markdown artifacts); matplotlib runs on the Agg backend because training machines have no display.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def metric_key(name: str) -> str:
    """``'mrr@20'`` -> ``'mrr_20'``: MLflow metric names allow letters, digits, ``_-./`` and spaces only."""
    out = []
    for ch in name:
        out.append(ch if ch.isalnum() or ch in "_-./ " else "_")
    return "".join(out)


def numeric_items(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics dict (bools and nested dicts skipped), keys made MLflow-safe."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[metric_key(str(key))] = float(value)
    return out


def epoch_rows(history: Sequence[Mapping[str, Any]]) -> list[dict[str, float]]:
    """One flat row per epoch: epoch, train_loss, events_per_second, epoch_seconds, valid_<metric>..."""
    rows = []
    for entry in history:
        row = {k: float(v) for k, v in numeric_items(entry).items()}
        for key, value in numeric_items(entry.get("valid") or {}).items():
            row[f"valid_{key}"] = value
        rows.append(row)
    return rows


def write_epoch_csv(history: Sequence[Mapping[str, Any]], path: Path) -> Path:
    rows = epoch_rows(history)
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    with Path(path).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns or ["epoch"])
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def write_epoch_plot(history: Sequence[Mapping[str, Any]], path: Path, metric: str = "mrr@20") -> Path:
    """PNG with train loss and the validation recall/MRR/NDCG per epoch (two panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = epoch_rows(history)
    epochs = [row.get("epoch", i + 1) for i, row in enumerate(rows)]
    fig, (ax_loss, ax_valid) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [row.get("train_loss", float("nan")) for row in rows], marker="o")
    ax_loss.set(title="train loss", xlabel="epoch")
    cutoff = metric.partition("@")[2] or "20"
    for name in ("recall", "mrr", "ndcg"):
        key = f"valid_{name}_{cutoff}"
        if any(key in row for row in rows):
            ax_valid.plot(epochs, [row.get(key, float("nan")) for row in rows], marker="o", label=key)
    ax_valid.set(title="validation", xlabel="epoch")
    if ax_valid.has_data():
        ax_valid.legend()
    for ax in (ax_loss, ax_valid):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def metrics_markdown(models: Mapping[str, Mapping[str, Any]], metrics: Sequence[str] | None = None) -> str:
    """Markdown table, one row per model, one column per metric (default: every @K metric)."""
    if metrics is None:
        seen: list[str] = []
        for values in models.values():
            seen.extend(k for k in values if "@" in k and k not in seen)
        metrics = seen
    lines = ["| model | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for name, values in models.items():
        cells = []
        for key in metrics:
            value = values.get(key)
            cells.append(f"{value:.4f}" if isinstance(value, (int, float)) else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
