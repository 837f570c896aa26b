"""The GRU-vs-baselines comparison table printed by ``recsys evaluate`` (and reusable by reports)."""

from __future__ import annotations

from rich import box
from rich.table import Table

DISPLAY_NAMES = {"gru4rec": "GRU4Rec", "item-knn": "item-kNN", "most-popular": "most-popular"}
HEADERS = {"recall": "Recall", "mrr": "MRR", "ndcg": "NDCG", "coverage": "coverage", "popularity": "pop."}


def table_columns(cutoffs: list[int]) -> list[str]:
    """Metric keys shown: Recall/MRR/NDCG at every cutoff above 1, coverage and popularity at the largest.

    At K = 1 recall, MRR and NDCG coincide, so that column adds nothing (it stays in the JSON).
    """
    cutoffs = sorted(cutoffs)
    shown = [k for k in cutoffs if k > 1] or cutoffs
    top = cutoffs[-1]
    return [f"{m}@{k}" for k in shown for m in ("recall", "mrr", "ndcg")] + [
        f"coverage@{top}", f"popularity@{top}"
    ]


def metrics_table(
    rows: dict[str, dict[str, float]], cutoffs: list[int], split: str, policy: str
) -> Table:
    """One row per model; the caption says how every target was counted and under which policy.

    Every metric is over all targets (the unrankable ones count as misses): the same figure the
    promotion gate compares, under the same name.
    """
    from recsys.training.evaluate import target_line

    columns = table_columns(cutoffs)
    first = next((m for m in rows.values() if "n_queries" in m), {})  # every row ranks the same targets
    caption = f"{target_line(first)} (metrics over all targets) · policy: {policy}"
    table = Table(title=f"Full-catalogue evaluation on {split}", caption=caption, box=box.SIMPLE_HEAD)
    table.add_column("model", no_wrap=True)
    for col in columns:
        metric, _, k = col.partition("@")
        table.add_column(f"{HEADERS[metric]}\n@{k}", justify="right", no_wrap=True)
    for name, metrics in rows.items():
        table.add_row(DISPLAY_NAMES.get(name, name), *(_cell(metrics, c) for c in columns))
    return table


def _cell(metrics: dict[str, float], key: str) -> str:
    """Popularity (a count) with one decimal, rates with four; a metric not computed shows as a dash."""
    if key not in metrics:
        return "–"
    return f"{metrics[key]:.1f}" if key.startswith("popularity") else f"{metrics[key]:.4f}"
