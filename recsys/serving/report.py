"""Rich tables for ``recsys score``: the run summary and a few users' lists read back from the export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
from rich.console import Console
from rich.table import Table

from recsys.schemas import ITEM_ID, RANK, SCORE, SOURCE, USER_ID
from recsys.serving.export import TITLE, list_source, with_titles

SUMMARY_COUNTS = (
    "users_scored", "users_model", "users_popular", "users_requested", "unknown_users",
    "history_events", "unknown_item_events", "unknown_items", "excluded_items", "rows",
)


def summary_table(manifest: dict[str, Any]) -> Table:
    counts, timings, model = manifest["counts"], manifest["timings"], manifest["model"]
    table = Table(title=f"recsys score · run_date {manifest['run_date']}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    table.add_row("model", f"{model['name']} v{model['version']}  ({model['requested_uri']})")
    table.add_row("device", manifest["device"])
    for key in SUMMARY_COUNTS:
        if counts.get(key) is not None:
            table.add_row(key.replace("_", " "), f"{counts[key]:,}")
    total = timings.get("total_s") or sum(timings.values())
    table.add_row("users / s", f"{counts['users_scored'] / max(total, 1e-9):,.0f}")
    table.add_row("time", "  ".join(f"{k.removesuffix('_s')} {v:.2f}s" for k, v in timings.items()))
    table.add_row("export", manifest["path"])
    for name, path in manifest.get("extra_paths", {}).items():
        table.add_row(name, path)
    return table


def sample_table(export_path: Path, n_users: int = 3, titles: pl.DataFrame | None = None) -> Table:
    """The first ``n_users`` users' lists from the published files (what a consumer will read).

    Items show as their title when the export has its ``title`` column or ``titles`` (``item_id, title``)
    knows them, else as the id.
    """
    recs = pl.scan_parquet(Path(export_path) / "*.parquet")
    users = recs.select(USER_ID).unique(maintain_order=True).head(n_users).collect()[USER_ID]
    rows = recs.filter(pl.col(USER_ID).is_in(users.implode())).sort(USER_ID, RANK).collect()
    if TITLE not in rows.columns and titles is not None:
        rows = with_titles(rows, titles)
    label = (pl.coalesce(pl.col(TITLE), pl.col(ITEM_ID).cast(pl.String)) if TITLE in rows.columns
             else pl.col(ITEM_ID).cast(pl.String))
    rows = rows.with_columns(label.alias("_label"))
    table = Table(title=f"sample: {len(users)} users")
    for col in (USER_ID, SOURCE, "top items (score)"):
        table.add_column(col)
    for (user,), frame in rows.group_by(USER_ID, maintain_order=True):
        head = frame.head(5)
        shown = [f"{item} (next episode)" if source == "continuation" else f"{item} ({score:.3g})"
                 for item, score, source in zip(head["_label"], head[SCORE], head[SOURCE], strict=True)]
        more = f" … +{frame.height - 5}" if frame.height > 5 else ""
        table.add_row(str(user), frame.select(list_source())[SOURCE][0], ", ".join(shown) + more)
    return table


def print_score_summary(console: Console, manifest: dict[str, Any], n_users: int = 3,
                        titles: pl.DataFrame | None = None) -> None:
    console.print(summary_table(manifest))
    if manifest["rows"]:
        console.print(sample_table(Path(manifest["path"]), n_users, titles))
