"""Sharded batch scoring: the same export as ``score_users``, computed as N independent user shards.

Why: scoring is embarrassingly parallel over users, so an orchestrator (Prefect on a Dask or Ray cluster)
can run the shards on different workers. Each shard is a contiguous range of the *sorted* user ids that
have events before the run date's cutoff — exactly the population and order ``score_users`` uses — so
concatenating the shards in shard order reproduces the single-process frame row for row.

Each shard runs the unchanged ``recsys.serving.score.score_users`` with a users file, publishing into its own
staging folder (validated there, including the already-watched check that needs the histories); the
merge re-validates the whole frame and publishes it atomically once, with one manifest. Only paths and
small dicts go in and out, so shards can run in other processes or on other machines sharing the data.
"""

from __future__ import annotations

import logging
import shutil
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import polars as pl

from recsys.config import Config
from recsys.schemas import ITEM_ID, RANK, TS, USER_ID
from recsys.serving.export import (
    DATA_FILE,
    RecsChecks,
    partition_dir,
    publish_recs,
    read_manifest,
    snapshot_hash,
)
from recsys.serving.histories import event_files

log = logging.getLogger(__name__)

SHARDS_DIR = "_shards"  # under paths.exports_dir, beside export.py's own _staging/
USERS_FILE = "users.parquet"
SUMMED_COUNTS = ("events_before_cutoff", "users_with_events", "history_events", "unknown_item_events",
                 "history_items_truncated", "users_scored", "users_model", "users_popular", "rows")


def shards_root(config: Config, run_date: date) -> Path:
    return Path(config.paths.exports_dir) / SHARDS_DIR / f"run_date={run_date.isoformat()}"


def shard_dir(config: Config, run_date: date, shard: int, n_shards: int) -> Path:
    return shards_root(config, run_date) / f"shard-{shard:04d}-of-{n_shards:04d}"


def shard_users(config: Config, run_date: date, shard: int, n_shards: int,
                events_dir: Path | None = None) -> pl.Series:
    """The ``shard``-th of ``n_shards`` contiguous ranges of the sorted users with events before cutoff."""
    from recsys.serving.score import history_cutoff

    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} out of range for {n_shards} shards")
    cutoff = history_cutoff(run_date)
    files = event_files(Path(events_dir or config.paths.events_dir), before=cutoff)
    if not files:
        raise FileNotFoundError(f"no events Parquet files under {events_dir or config.paths.events_dir}")
    users = (
        pl.scan_parquet(files, hive_partitioning=False)
        .filter(pl.col(TS) < cutoff)
        .select(USER_ID)
        .unique()
        .sort(USER_ID)
        .collect()[USER_ID]
    )
    lo, hi = len(users) * shard // n_shards, len(users) * (shard + 1) // n_shards
    return users.slice(lo, hi - lo)


def score_shard(
    config: Config,
    model_uri: str | None = None,
    run_date: date | None = None,
    shard: int = 0,
    n_shards: int = 1,
    events_dir: Path | None = None,
) -> dict[str, Any]:
    """Score one shard into its staging folder; returns ``{"shard", "dir", "rows", "users"}``."""
    from recsys.serving.score import score_users

    run_date = run_date or datetime.now(UTC).date()
    folder = shard_dir(config, run_date, shard, n_shards)
    shutil.rmtree(folder, ignore_errors=True)  # a retried or re-run shard starts clean
    folder.mkdir(parents=True)
    users = shard_users(config, run_date, shard, n_shards, events_dir)
    summary: dict[str, Any] = {"shard": shard, "n_shards": n_shards, "dir": str(folder), "users": len(users)}
    if not len(users):  # more shards than users
        return {**summary, "rows": 0}
    users.to_frame().write_parquet(folder / USERS_FILE)
    manifest = score_users(config, model_uri=model_uri, run_date=run_date, users_file=folder / USERS_FILE,
                           events_dir=events_dir, out_dir=folder)
    log.info("shard %d/%d: %d users -> %d rows", shard + 1, n_shards, len(users), manifest["rows"])
    return {**summary, "rows": int(manifest["rows"])}


def publish_shards(
    config: Config,
    shards: list[dict[str, Any]],
    run_date: date | None = None,
    events_dir: Path | None = None,
) -> dict[str, Any]:
    """Concatenate the shards in shard order, validate, publish ``exports/recs/run_date=...`` atomically.

    Returns the manifest (as ``score_users`` does: with ``path``, ``run_date`` and ``rows``). The staging
    folders are removed after the publication.
    """
    from recsys.serving.score import catalogue_titles

    run_date = run_date or datetime.now(UTC).date()
    ordered = sorted(shards, key=lambda s: s["shard"])
    if [s["shard"] for s in ordered] != list(range(len(ordered))) or any(
        s["n_shards"] != len(ordered) for s in ordered
    ):
        raise ValueError(f"incomplete shard set: {[(s['shard'], s['n_shards']) for s in ordered]}")
    parts, manifests = [], []
    for s in ordered:
        if s["rows"] == 0:
            continue
        part = partition_dir(Path(s["dir"]), run_date)
        parts.append(pl.read_parquet(part / DATA_FILE))
        manifests.append(read_manifest(part))
    if not parts:
        raise ValueError(f"no shard produced recommendations for run_date={run_date}")
    recs = pl.concat(parts, how="vertical")
    first = manifests[0]
    counts = {key: sum(int(m["counts"].get(key) or 0) for m in manifests) for key in SUMMED_COUNTS}
    counts.update({"users_requested": None, "unknown_users": 0,
                   "excluded_items": first["counts"].get("excluded_items"),
                   "excluded_items_unknown": first["counts"].get("excluded_items_unknown")})
    sc = config.score
    events_dir = Path(events_dir or config.paths.events_dir)
    files = event_files(events_dir, before=datetime.fromisoformat(first["input"]["history_cutoff"]))
    extra = [sc.exclude_items_file] if sc.exclude_items_file else []
    manifest = {
        **{k: v for k, v in first.items() if k not in ("counts", "input", "timings", "files", "dataset",
                                                        "created_at", "rows", "run_date")},
        "counts": counts,
        "input": {**first["input"], "users_file": None, "snapshot_hash": snapshot_hash(files, extra)},
        "shards": len(ordered),
        "timings": {key: round(sum(float(m["timings"].get(key, 0.0)) for m in manifests), 4)
                    for key in first.get("timings", {})},
    }
    excluded = None
    if sc.exclude_items_file:
        from recsys.serving.score import read_id_file

        excluded = read_id_file(sc.exclude_items_file, ITEM_ID)
    # The already-watched check ran in every shard (it needs the histories); here: ranks, uniqueness,
    # exclusions and types of the merged frame.
    checks = RecsChecks(top_k=sc.top_k, excluded_items=excluded)
    result = publish_recs(
        recs.sort(USER_ID, RANK, maintain_order=True), exports_dir=config.paths.exports_dir,
        run_date=run_date, manifest=manifest, checks=checks, write_csv=sc.write_csv, write_wide=sc.write_wide,
        titles=catalogue_titles(config),
    )
    shutil.rmtree(shards_root(config, run_date), ignore_errors=True)
    log.info("merged %d shards: %d rows -> %s", len(ordered), recs.height, result.path)
    return {**manifest, "path": str(result.path), "run_date": run_date.isoformat(), "rows": recs.height,
            "extra_paths": {k: str(v) for k, v in result.extra_paths.items()}}
