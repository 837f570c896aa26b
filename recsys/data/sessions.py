"""Events -> sequences: sessionise each user's time-ordered events and filter them.

A single global sort of all events by (user, ts) is the slowest step of the data path and holds everything
in memory. Sessions never cross users, so users are split into ``sessions.n_buckets`` hash buckets and
each bucket is read (a filtered lazy scan), sorted, sessionised and written on its own: memory is bounded
by the largest bucket and the output does not depend on the bucket count.

Per bucket, in this order:
1. sort by (user, ts, item_id) — equal timestamps are ordered by item id, so the result is deterministic;
2. cut sequences: ``gap`` mode starts a new session when the user's inactivity before an event is
   strictly greater than ``gap_minutes`` (exactly ``gap_minutes`` stays in the session). Inactivity runs
   from the end of the previous play (``ts + watch_seconds``) when the events have ``watch_seconds`` and
   ``gap_from_end`` is on (a 50-minute episode followed by the next one is one sitting), else from the
   previous event's ``ts``. ``user`` mode makes the whole history one sequence. Gaps are measured on all
   events, before filtering;
3. drop events of items with fewer than ``min_item_support`` events overall (counted on all events);
4. drop consecutive repeats (the same item twice in a row within a sequence, after step 3);
5. keep the last ``max_length`` events of each sequence, then drop sequences shorter than ``min_length``.

``session_id`` = (number of events of all users whose id sorts before this user) + (index of the sequence
among the user's sequences): unique, stable across runs and bucket counts, and computed without sorting
the events globally (only the distinct users are sorted).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.config import Config, SessionsConfig
from recsys.data.atomic_dir import fresh_tmp_dir, swap_into_place
from recsys.data.background import BackgroundWriter
from recsys.data.events_table import active_files, table_version
from recsys.data.stats import find_ingest_report
from recsys.schemas import (
    END_TS,
    ITEM_ID,
    ITEM_TS,
    ITEMS,
    SESSION_ID,
    START_TS,
    TS,
    TS_DTYPE,
    USER_ID,
    WATCH_SECONDS,
)

log = logging.getLogger(__name__)

SESSIONS_STATS_FILE = "_stats.json"
PART_GLOB = "part-*.parquet"
_HASH_SEED = 0x5EED  # bucket assignment only; it decides file layout, never content
_SEQ = "_seq"  # running sequence number within a bucket
_LOCAL = "_local"  # sequence index within its user
# Events read per scan pass. Measured peak RSS: ~0.3 GB + ~80 MB per million events in a pass (integer
# ids; 1.1 GB at 10M), so a 50M-event run stays near 1.1 GB; smaller passes cost one extra scan each.
EVENTS_PER_PASS = 10_000_000


def event_files(events_dir: Path, version: int | None = None) -> list[Path]:
    """The live Parquet files of the events table (of ``version``), from its log; a plain Parquet folder
    (hive or flat) is read as it is."""
    files = active_files(Path(events_dir), version=version)
    if not files:
        raise FileNotFoundError(f"events directory {events_dir} holds no Parquet files")
    return files


def session_files(sessions_dir: Path) -> list[Path]:
    """The bucket files of a sessions directory, sorted."""
    sessions_dir = Path(sessions_dir)
    files = sorted(sessions_dir.glob(PART_GLOB))
    if not files:
        raise FileNotFoundError(f"sessions directory {sessions_dir} holds no {PART_GLOB} files "
                                "(run `recsys sessions` first)")
    return files


def sessions_schema(user_dtype: pl.DataType, item_dtype: pl.DataType) -> dict[str, pl.DataType]:
    return {
        SESSION_ID: pl.Int64,
        USER_ID: user_dtype,
        START_TS: TS_DTYPE,
        END_TS: TS_DTYPE,
        ITEMS: pl.List(item_dtype),
        ITEM_TS: pl.List(TS_DTYPE),
    }


def build_sessions(
    config: Config,
    events_dir: Path | None = None,
    out_dir: Path | None = None,
    *,
    events_per_pass: int = EVENTS_PER_PASS,
) -> dict[str, Any]:
    """Read events, write ``part-XXXX.parquet`` sequence files (sessions contract) atomically; return stats.

    Buckets are read in passes of about ``events_per_pass`` events (one filtered scan per pass, after
    one scan for the global counts), which bounds memory at any scale; data that fits one pass is read
    once and counted in memory.
    """
    cfg = config.sessions
    events_dir = Path(events_dir) if events_dir is not None else config.paths.events_dir
    out_dir = Path(out_dir) if out_dir is not None else config.paths.sessions_dir
    started = time.perf_counter()

    version = table_version(events_dir)  # read one version: a concurrent ingest commit is not mixed in
    files = event_files(events_dir, version)
    source = pl.scan_parquet(files, missing_columns="insert", extra_columns="ignore")
    columns = [pl.col(USER_ID), pl.col(ITEM_ID), pl.col(TS).cast(TS_DTYPE)]
    if cfg.mode == "gap" and cfg.gap_from_end and WATCH_SECONDS in source.collect_schema():
        columns.append(pl.col(WATCH_SECONDS).cast(pl.Float64))
    scan = source.select(columns)
    schema = scan.collect_schema()
    out_schema = sessions_schema(schema[USER_ID], schema[ITEM_ID])
    passes = _bucket_passes(scan.select(pl.len()).collect().item(), cfg.n_buckets, events_per_pass)
    # Data that fits one pass is read once and counted in memory; larger data is scanned for the counts.
    events = scan.collect() if len(passes) == 1 else None
    counted = scan if events is None else events.lazy()
    # What must be global: per-user event counts (session id offsets), item support.
    user_counts, item_counts = pl.collect_all(
        [counted.group_by(USER_ID).len(), counted.group_by(ITEM_ID).len()], engine="streaming"
    )
    del counted
    n_events = int(user_counts["len"].sum())
    if n_events == 0:
        raise ValueError(f"events directory {events_dir} holds no events")
    user_offsets = user_counts.sort(USER_ID).select(
        USER_ID, (pl.col("len").cum_sum() - pl.col("len")).cast(pl.Int64).alias("_offset")
    )
    rare = item_counts.filter(pl.col("len") < cfg.min_item_support)[ITEM_ID]
    log.info("sessions: %d events, %d users, %d items (%d below support %d), %d buckets",
             n_events, user_counts.height, item_counts.height, rare.len(), cfg.min_item_support,
             cfg.n_buckets)

    tmp = fresh_tmp_dir(out_dir)
    counters = {"events_rare_items": 0, "events_repeats": 0, "events_truncated": 0,
                "sequences_too_short": 0, "events_in_short_sequences": 0}
    lengths: list[np.ndarray] = []
    out_users: list[pl.Series] = []
    out_items: list[pl.Series] = []
    try:
        with BackgroundWriter() as writer:
            for buckets in passes:
                parts = _read_buckets(scan if events is None else events.lazy(), buckets, cfg.n_buckets)
                events = None
                for bucket in buckets:
                    frame, counts = sessionise(parts.pop(bucket), cfg, rare, max_runs=len(files) + 1)
                    frame = _with_session_ids(frame, user_offsets, out_schema)
                    # lz4: an intermediate file; about 2x cheaper to write than zstd, ~30 % larger
                    writer.submit(frame.write_parquet, tmp / f"part-{bucket:04d}.parquet", compression="lz4")
                    for key, value in counts.items():
                        counters[key] += value
                    lengths.append(frame[ITEMS].list.len().to_numpy())
                    out_users.append(frame[USER_ID].unique())
                    out_items.append(frame[ITEMS].explode().unique())
        all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
        stats: dict[str, Any] = {
            "mode": cfg.mode,
            "events_in": n_events,
            "users_in": user_counts.height,
            "items_in": item_counts.height,
            **counters,
            "events": int(all_lengths.sum()),
            "sessions": int(len(all_lengths)),
            "users": int(pl.concat(out_users).n_unique()) if out_users else 0,
            "items": int(pl.concat(out_items).n_unique()) if out_items else 0,
            "length": length_summary(all_lengths),
            "n_buckets": cfg.n_buckets,
            "events_dir": str(Path(events_dir).resolve()),
            "events_version": version,  # lineage: the events table version these sequences came from
            "ingest": find_ingest_report(events_dir),
        }
        elapsed = time.perf_counter() - started
        stats["seconds"] = round(elapsed, 3)
        stats["events_per_second"] = round(n_events / elapsed) if elapsed > 0 else None
        (tmp / SESSIONS_STATS_FILE).write_text(json.dumps(stats, indent=2))
        swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("sessions: %d sequences, %d events kept, %.1f s (%s events/s) -> %s",
             stats["sessions"], stats["events"], elapsed, stats["events_per_second"], out_dir)
    return stats


def _with_session_ids(
    frame: pl.DataFrame, user_offsets: pl.DataFrame, out_schema: dict[str, pl.DataType]
) -> pl.DataFrame:
    """session_id = the user's global event offset + the sequence's index within the user."""
    return (
        frame.join(user_offsets, on=USER_ID, how="left", maintain_order="left")
        .with_columns((pl.col("_offset") + pl.col(_LOCAL)).alias(SESSION_ID))
        .select(list(out_schema))
        .cast(out_schema)  # type: ignore[arg-type]
    )


def _bucket_passes(n_events: int, n_buckets: int, events_per_pass: int) -> list[range]:
    """Contiguous bucket ranges, each holding about ``events_per_pass`` events: one scan reads a range."""
    n_passes = min(n_buckets, max(1, -(-n_events // events_per_pass)))
    bounds = [p * n_buckets // n_passes for p in range(n_passes + 1)]
    return [range(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def _read_buckets(scan: pl.LazyFrame, buckets: range, n_buckets: int) -> dict[int, pl.DataFrame]:
    """Events of the users hashed into ``buckets``, one frame per bucket (one filtered scan)."""
    bucket = (pl.col(USER_ID).hash(_HASH_SEED) % n_buckets).cast(pl.Int32).alias("_bucket")
    frame = scan.with_columns(bucket)
    if len(buckets) < n_buckets:
        frame = frame.filter(pl.col("_bucket").is_between(buckets.start, buckets.stop - 1))
    parts = frame.collect().partition_by("_bucket", as_dict=True, include_key=False)
    empty = scan.limit(0).collect()
    return {b: parts.get((b,), empty) for b in buckets}


def order_events(events: pl.DataFrame, max_runs: int = 0) -> pl.DataFrame:
    """Sort events by (user, ts, item_id).

    Fast path for what ingest writes: date files each sorted by (user, ts, item), read in date order.
    Then the user column restarts at most once per file (``max_runs``), and a stable sort by user alone
    gives the full order (about 3x cheaper than the three-key sort); the result is verified, and any
    other input takes the full sort.
    """
    full = [USER_ID, TS, ITEM_ID]
    if events.height < 2 or max_runs <= 0:
        return events.sort(full)
    user, ts, item = pl.col(USER_ID), pl.col(TS), pl.col(ITEM_ID)
    restarts = events.select((user < user.shift(1)).sum()).item()
    if restarts >= max_runs:
        return events.sort(full)
    by_user = events.sort(USER_ID, maintain_order=True)
    backwards = (user == user.shift(1)) & (
        (ts < ts.shift(1)) | ((ts == ts.shift(1)) & (item < item.shift(1)))
    )
    if by_user.select(backwards.any()).item():
        return events.sort(full)
    return by_user


def sessionise(
    events: pl.DataFrame, cfg: SessionsConfig, rare_items: pl.Series, max_runs: int = 0
) -> tuple[pl.DataFrame, dict]:
    """Events of some users (user_id, item_id, ts; any order) -> one row per kept sequence.

    Returns the sequences (user_id, _local, start_ts, end_ts, items, ts; ordered by user then time) and
    counts of what each filter removed. ``max_runs``: see :func:`order_events`.
    """
    frame = order_events(events, max_runs)
    new_user = (pl.col(USER_ID) != pl.col(USER_ID).shift(1)).fill_null(True)
    if cfg.mode == "gap":
        gap_us = round(cfg.gap_minutes * 60 * 1_000_000)
        ts_us = pl.col(TS).dt.epoch("us")
        prev_end = ts_us.shift(1)
        if WATCH_SECONDS in frame.columns:  # inactivity starts when the previous play ended
            watched = pl.col(WATCH_SECONDS).fill_null(0.0).fill_nan(0.0).clip(lower_bound=0.0)
            prev_end = prev_end + (watched * 1_000_000).round().cast(pl.Int64).shift(1)
        new_seq = new_user | (ts_us - prev_end > gap_us).fill_null(True)
    else:
        new_seq = new_user
    frame = frame.with_columns(new_user.alias("_new_user"), new_seq.alias("_new_seq")).with_columns(
        (pl.col("_new_seq").cum_sum() - 1).cast(pl.Int64).alias(_SEQ)
    )
    # Sequence index within the user = running number minus the user's first running number.
    frame = frame.with_columns(
        (pl.col(_SEQ) - pl.when("_new_user").then(pl.col(_SEQ)).forward_fill()).alias(_LOCAL)
    ).select(USER_ID, ITEM_ID, TS, _SEQ, _LOCAL)
    counts = {}

    n0 = frame.height
    if rare_items.len():
        frame = frame.filter(~pl.col(ITEM_ID).is_in(rare_items.implode()))
    counts["events_rare_items"] = n0 - frame.height

    n1 = frame.height
    if cfg.drop_consecutive_repeats:
        repeat = (pl.col(ITEM_ID) == pl.col(ITEM_ID).shift(1)) & (pl.col(_SEQ) == pl.col(_SEQ).shift(1))
        frame = frame.filter(~repeat.fill_null(False))
    counts["events_repeats"] = n1 - frame.height

    # _SEQ is a running count, so each sequence is one contiguous slice; telling polars so makes the
    # list aggregation take slices instead of gathering rows (measured ~5x faster).
    seqs = frame.with_columns(pl.col(_SEQ).set_sorted()).group_by(_SEQ, maintain_order=True).agg(
        pl.col(USER_ID).first(), pl.col(_LOCAL).first(),
        pl.col(ITEM_ID).alias(ITEMS), pl.col(TS).alias(ITEM_TS),
    )
    full_len = seqs[ITEMS].list.len()
    if cfg.max_length is not None:
        seqs = seqs.with_columns(pl.col(ITEMS, ITEM_TS).list.tail(cfg.max_length))
    kept_len = seqs[ITEMS].list.len()
    counts["events_truncated"] = int((full_len - kept_len).sum() or 0)
    short = kept_len < cfg.min_length
    counts["sequences_too_short"] = int(short.sum())
    counts["events_in_short_sequences"] = int(kept_len.filter(short).sum() or 0)
    seqs = seqs.filter(~short).with_columns(
        pl.col(ITEM_TS).list.first().alias(START_TS), pl.col(ITEM_TS).list.last().alias(END_TS)
    )
    return seqs.select(USER_ID, _LOCAL, START_TS, END_TS, ITEMS, ITEM_TS), counts


def length_summary(lengths: np.ndarray) -> dict[str, float]:
    """Sequence length percentiles (p50/p90/p99), mean and max; zeros for no sequences."""
    if len(lengths) == 0:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0}
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    return {"mean": round(float(np.mean(lengths)), 3), "p50": float(p50), "p90": float(p90),
            "p99": float(p99), "max": int(np.max(lengths))}
