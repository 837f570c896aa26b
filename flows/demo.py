"""`recsys pipeline`: run pipeline_flow locally and show what it produced.

The flow runs against Prefect's ephemeral API (state under <data_root>/prefect) and the embedded MLflow
store (<data_root>/mlflow); nothing needs to be started first.
"""

from __future__ import annotations

import logging
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import polars as pl
from rich.console import Console
from rich.table import Table

from flows._common import flow_config, fmt
from flows.pipeline import pipeline_flow
from flows.reports import split_training_metrics
from recsys.data.events_table import scan_events
from recsys.schemas import ITEM_ID, RANK, SOURCE, TS, USER_ID

# Demo-sized training on the default (300k-event) synthetic data, so that the whole pipeline stays
# well under 5 minutes on a 2-core laptop: fewer epochs, and no system-metrics sampler thread.
# `recsys pipeline --full` uses conf/ as is; any --set wins over these.
DEMO_OVERRIDES: tuple[str, ...] = (
    "train.epochs=3",
    "train.patience=2",
    "tracking.system_metrics=false",
)

SHOWN_METRICS = ("recall@10", "recall@20", "mrr@20", "ndcg@20", "coverage@20")
LIST_ROWS = 8  # rows of each sample list: past the (up to 6) continuation slots to the model's own picks


def run_pipeline(
    overrides: list[str],
    run_date: date | None = None,
    inputs: list[Path] | None = None,
    shards: int = 1,
    executor: str = "threads",
) -> dict[str, Any]:
    """Run pipeline_flow (raises if any stage fails) and add the wall time."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per Prefect API call otherwise
    t0 = time.perf_counter()
    summary = pipeline_flow(
        run_date=run_date, input=[str(p) for p in inputs] if inputs else None, shards=shards,
        executor=executor, overrides=overrides,
    )
    return {**summary, "wall_seconds": round(time.perf_counter() - t0, 1)}


# `recsys pipeline --days N`: a one-day holdout, so each daily update trains on events up to yesterday.
FRESH_OVERRIDES: tuple[str, ...] = ("split.test_days=1", "split.valid_days=3")
HISTORY_SHARE = 0.7  # the first day's pipeline sees this share of the synthetic period (releases follow)


def split_raw_by_day(files: list[Path], out_dir: Path, first_day: date,
                     n_days: int) -> tuple[Path, list[Path]]:
    """Raw event files -> one file of history (before ``first_day``, plus rows whose time cannot be
    read: the ingest quarantines them) and one file per following day, as a daily log drop would be."""
    raw = pl.concat([pl.read_parquet(f) for f in files], how="vertical_relaxed")
    day = pl.col(TS).str.to_datetime(strict=False, time_zone="UTC").dt.date()
    raw = raw.with_columns(_day=day)
    out_dir.mkdir(parents=True, exist_ok=True)
    history = out_dir / "history.parquet"
    raw.filter(pl.col("_day").is_null() | (pl.col("_day") < first_day)).drop("_day").write_parquet(history)
    days = []
    for k in range(n_days):
        d = first_day + timedelta(days=k)
        path = out_dir / f"day-{d.isoformat()}.parquet"
        raw.filter(pl.col("_day") == d).drop("_day").write_parquet(path)
        days.append(path)
    return history, days


def run_days(overrides: list[str], n_days: int, shards: int = 1, executor: str = "threads") -> dict[str, Any]:
    """Day 1: the whole pipeline on the synthetic history; then ``n_days - 1`` daily cycles (ingest ->
    update -> promote -> score), each on the next day of the synthetic log."""
    from flows.update import daily_flow
    from recsys.data.synthetic import generate

    logging.getLogger("httpx").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    config = flow_config(overrides)
    generated = generate(config)
    start = config.generate.start_date.date()
    first_day = start + timedelta(days=max(1, int(config.generate.days * HISTORY_SHARE) - n_days + 1))
    history, day_files = split_raw_by_day([Path(f) for f in generated["files"]],
                                          config.paths.raw_dir / "days", first_day, n_days - 1)
    summary = pipeline_flow(run_date=first_day, input=[str(history)], shards=shards, executor=executor,
                            overrides=overrides)
    days = [{"run_date": str(first_day), "kind": "full training",
             "version": (summary["train"].get("training") or {}).get("model_version"),
             "promoted": (summary["train"].get("decision") or {}).get("promoted"), "new_items": None}]
    result = {**summary, "generated": generated, "catalogue": generated.get("catalogue")}
    for k, path in enumerate(day_files, start=1):
        day = first_day + timedelta(days=k)
        cycle = daily_flow(run_date=day, input=[str(path)], catalogue=generated.get("catalogue"),
                           overrides=overrides)
        update, decision = cycle["update"]["update"], cycle["update"]["decision"] or {}
        days.append({"run_date": str(day), "kind": "update", "version": update.get("model_version"),
                     "promoted": decision.get("promoted"), "new_items": update.get("n_new_items"),
                     "lineage": update.get("lineage"), "reason": decision.get("reason")})
        result.update(run_date=str(day), score=cycle["score"],
                      train={"training": {"metrics": {}, "model_version": update.get("model_version")},
                             "decision": decision, "run_url": summary["train"].get("run_url")})
    return {**result, "days": days, "wall_seconds": round(time.perf_counter() - t0, 1)}


def print_days(console: Console, days: list[dict[str, Any]]) -> None:
    """One row per simulated day: what ran, the version it registered, new items, the gate's verdict."""
    table = Table(title="day by day (first day: full pipeline; then ingest -> update -> promote -> score)",
                  title_justify="left")
    for column in ("run date", "stage", "version", "new items", "promoted"):
        table.add_column(column)
    for row in days:
        table.add_row(row["run_date"], row["kind"], str(row.get("version")), fmt(row.get("new_items")),
                      "yes" if row.get("promoted") else "no")
    console.print(table)
    for row in days:
        if row.get("lineage"):
            console.print(f"{row['run_date']}: {row['lineage']} — {row.get('reason', '')}")


def _titles(catalogue: Path | None) -> pl.DataFrame | None:
    if catalogue is None or not Path(catalogue).is_file():
        return None
    cat = pl.read_parquet(catalogue)
    extra = [pl.col("genre")] if "genre" in cat.columns else []
    return cat.select(pl.col(ITEM_ID), pl.col("title"), *extra)


def _label(item_id: Any, titles: pl.DataFrame | None) -> str:
    if titles is None:
        return str(item_id)
    row = titles.filter(pl.col(ITEM_ID) == item_id)
    if not row.height:
        return str(item_id)
    genre = f" [{row['genre'][0]}]" if "genre" in row.columns else ""
    return f"{row['title'][0]}{genre}"


def rewatchers(events: pl.LazyFrame, catalogue: Path | None, limit: int = 1) -> list[Any]:
    """Viewers whose latest watch is an episode of a series they had already watched further into: a
    re-watch, where the list should continue with the next episode, not skip what was seen years ago."""
    if catalogue is None or not Path(catalogue).is_file():
        return []
    cat = (pl.scan_parquet(catalogue).select(ITEM_ID, "series_id", "episode")
           .filter(pl.col("series_id").is_not_null()))
    watched = events.select(USER_ID, ITEM_ID, TS).join(cat, on=ITEM_ID)
    last = watched.sort(TS).group_by(USER_ID).last()
    furthest = watched.group_by(USER_ID, "series_id").agg(pl.col("episode").max().alias("furthest"))
    found = (last.join(furthest, on=[USER_ID, "series_id"])
             .filter(pl.col("furthest") > pl.col("episode") + 1).sort(USER_ID).head(limit).collect())
    return found[USER_ID].to_list()


def champion_vs_popular(train: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The champion's test metrics beside most-popular (and item-kNN) on the same holdout."""
    decision = train.get("decision") or {}
    trained = split_training_metrics((train.get("training") or {}).get("metrics") or {})
    if decision.get("promoted"):
        champ = decision.get("challenger_metrics") or trained.get("gru4rec", {})
        label = f"GRU4Rec champion v{decision.get('challenger_version')} (new)"
    elif decision.get("champion_metrics"):
        champ, label = decision["champion_metrics"], f"GRU4Rec champion v{decision.get('champion_version')}"
    else:
        champ = trained.get("gru4rec", {})
        version = decision.get("champion_version") or train["training"].get("model_version")
        label = f"GRU4Rec champion v{version}"
    rows = {label: champ}
    popular = decision.get("popular_metrics") or trained.get("most_popular")
    if popular:
        rows["most popular"] = popular
    if "item_knn" in trained:
        rows["item-kNN"] = trained["item_knn"]
    return rows


def print_summary(console: Console, summary: dict[str, Any], overrides: list[str], n_users: int = 3) -> None:
    """Where the export is, a few users' next-watch lists with titles, champion vs most-popular, UIs."""
    config = flow_config(overrides)
    score = summary["score"]
    export = Path(score["path"])
    console.rule(f"[bold]pipeline {summary['run_date']} finished in {summary['wall_seconds']} s")
    console.print(f"export: [bold]{export}[/bold]  ({score.get('rows')} rows, "
                  f"{(score.get('counts') or {}).get('users_scored')} users, _manifest.json written last)")

    recs = pl.read_parquet(export / "part-0.parquet")
    found = sorted(config.paths.raw_dir.glob("*/catalogue.parquet"))
    ingested = config.paths.catalogue_file  # recsys catalogue / the update flow publish it here
    catalogue = ((ingested if ingested.is_file() else None) or summary.get("catalogue")
                 or (found[0] if found else None))
    titles = _titles(Path(catalogue) if catalogue else None)
    events = scan_events(config.paths.events_dir)
    model_users = recs.filter(pl.col(SOURCE) != "popular")[USER_ID].unique(maintain_order=True)
    users = model_users.head(n_users).to_list()
    scored = set(recs[USER_ID].unique().to_list())
    again = rewatchers(events, Path(catalogue) if catalogue else None)
    users += [u for u in again if u in scored and u not in users]
    for user in users:
        recent = (events.filter(pl.col(USER_ID) == user).sort(TS).select(ITEM_ID).tail(3).collect()[ITEM_ID])
        table = Table(title=f"user {user}", title_justify="left", show_edge=False)
        table.add_column("#", justify="right")
        table.add_column("next watch")
        table.add_column("score", justify="right")
        for row in recs.filter(pl.col(USER_ID) == user).sort(RANK).head(LIST_ROWS).iter_rows(named=True):
            placed = row[SOURCE] == "continuation"  # the rule's place, not a model score
            table.add_row(str(row[RANK]), _label(row[ITEM_ID], titles),
                          "next episode" if placed else f"{row['score']:.3f}")
        console.print("recently watched: " + " → ".join(_label(i, titles) for i in recent.to_list()))
        console.print(table)
    console.print(f"recommendation policy (stored in the model): {score.get('policy')}")

    metrics = Table(title="champion vs baselines (test split, full-catalogue ranking)", title_justify="left")
    metrics.add_column("model")
    for name in SHOWN_METRICS:
        metrics.add_column(name, justify="right")
    rows = champion_vs_popular(summary["train"])
    for model, values in rows.items():
        metrics.add_row(model, *(fmt(values.get(m)) for m in SHOWN_METRICS))
    counted = next((m for m in rows.values() if "n_queries" in m), None)
    if counted is not None:
        from recsys.training.evaluate import target_line

        metrics.caption = f"{target_line(counted)} (metrics over all targets, as the gate compares them)"
    console.print(metrics)
    decision = summary["train"].get("decision") or {}
    console.print(f"promotion: {'promoted' if decision.get('promoted') else 'not promoted'} — "
                  f"{decision.get('reason', '')}")
    console.print(f"MLflow run: {summary['train'].get('run_url')}")
    training = summary["train"].get("training") or {}
    monitoring = score.get("monitoring") or {}
    console.print(f"training report: [bold]{training.get('report_path', '–')}[/bold]")
    console.print(f"export report:   [bold]{score.get('report_path', '–')}[/bold]  "
                  f"(monitoring {str(monitoring.get('status', 'off')).upper()})")
    from recsys.tracking.store import resolve_tracking_uri

    embedded = resolve_tracking_uri(config).startswith("sqlite:")
    if config.tracking.ui_url is None and embedded:  # otherwise the run link above is the UI
        console.print("open the MLflow UI:  [bold]recsys ui[/bold]   (then http://127.0.0.1:5000)")
    console.print(f"Prefect runs are recorded under {config.paths.prefect_home}: "
                  f"PREFECT_HOME={config.paths.prefect_home.resolve()} prefect server start")
