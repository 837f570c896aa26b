"""Ingest: raw viewing logs -> validated, de-duplicated events, hive-partitioned by event date.

Steps (each reads only the previous one's output, so memory stays bounded by one date bucket, or by
the whole input when that is small):

1. open every input (``readers``): file-level problems (missing file or column, unreadable, empty)
   raise :class:`IngestError` before anything is written;
2. parse and validate each file in the streaming engine (``validate``) and stage the rows, split into
   ``ingest.staging_buckets`` buckets by event date (bad rows in their own bucket): in memory when
   the inputs are estimated at no more than ``staging.IN_MEMORY_ROWS`` rows, else on disk as lz4
   Parquet (``staging``);
3. write each input's rejected rows to ``quarantine/`` and stop with an error if the bad fraction is
   above ``ingest.max_bad_fraction`` (events are then left untouched);
4. per event date: sort by (user_id, ts, item_id), drop duplicates (same user, item, ts: the first in
   input order is kept) and atomically replace ``events/event_date=YYYY-MM-DD/part-0.parquet``
   (written on a background thread while the next date is sorted).

Partition policy: with ``partition_mode: replace`` (default) the rows of this run *become* the content
of every date they cover, and dates they do not cover are untouched: re-ingesting a corrected daily file
fixes that day. With ``merge`` they are unioned with what the partition already holds (for late events
arriving in a later file); rows equal to stored events count as duplicates. Each partition is replaced
atomically; a run killed midway leaves every partition either old or new, and re-running finishes it.

Conservation: every input data row is counted exactly once as an event written, a duplicate, or a
quarantined row (blank lines are not rows; they are counted separately).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.config import Config
from recsys.data import partitions
from recsys.data.background import BackgroundWriter
from recsys.data.errors import IngestError
from recsys.data.quarantine import write_quarantine
from recsys.data.readers import RawInput, scan_input
from recsys.data.staging import IN_MEMORY_ROWS, Stage
from recsys.data.validate import (
    BUCKET_BAD,
    SAMPLE_ROWS,
    ParsePlan,
    choose_id_type,
    choose_iso_format,
    choose_ts_mode,
    normalise,
    public_reason,
    time_bounds,
)
from recsys.schemas import EVENT_TYPE, ITEM_ID, TS, USER_ID, WATCH_SECONDS

__all__ = ["IngestError", "IngestReport", "FileReport", "ingest_files", "REPORT_FILE"]

logger = logging.getLogger(__name__)

REPORT_FILE = "ingest_report.json"
EVENT_COLUMNS = (USER_ID, ITEM_ID, TS, WATCH_SECONDS, EVENT_TYPE)
_KEY = [USER_ID, TS, ITEM_ID]  # partition order; equal keys are duplicates
_ORDER = [*_KEY, "_file", "_row"]


@dataclass
class FileReport:
    """What happened to one input."""

    source: str
    kind: str
    preset: str | None
    ts_mode: str
    rows: int = 0
    blank_lines: int = 0
    events_written: int = 0
    duplicates: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    quarantine_file: str | None = None


@dataclass
class IngestReport:
    """Counts of one ingest run; ``rows_in == events_written + duplicates + sum(quarantined)``."""

    rows_in: int
    events_written: int
    duplicates: int
    quarantined: dict[str, int]
    partitions: list[str]
    bad_fraction: float
    files: list[FileReport]
    events_dir: str
    quarantine_dir: str
    partition_mode: str
    user_id_type: str
    item_id_type: str
    partitions_replaced: int = 0  # of ``partitions``, those that held events before this run
    status: str = "ok"
    seconds: float = 0.0

    @property
    def n_quarantined(self) -> int:
        return sum(self.quarantined.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        """Write as JSON atomically (temp file + rename)."""
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        tmp.replace(path)


def _sample(raw: RawInput) -> tuple[RawInput, pl.DataFrame]:
    """The first rows (to choose types and encodings), and the reader to use: a fast reader that
    already fails on them is swapped for its fallback."""
    try:  # rows with structural problems say nothing about column types
        return raw, raw.frame.head(SAMPLE_ROWS).collect().filter(pl.col("_shape").is_null())
    except Exception as exc:
        if raw.fallback is not None:
            logger.info("%s: fast reader failed (%s); reading line by line", raw.path,
                        str(exc).splitlines()[0])
            return _sample(raw.fallback())
        raise IngestError(f"{raw.path}: cannot read the file: {exc}") from exc


def _type_name(dtype: pl.DataType) -> str:
    return "int" if dtype.is_integer() else "str"


def _plans(raws: list[RawInput], config: Config, now: datetime | None) -> list[ParsePlan]:
    cfg = config.ingest
    samples = []
    for i, raw in enumerate(raws):
        raws[i], sample = _sample(raw)
        samples.append(sample)
    existing = partitions.existing_schema(config.paths.events_dir) or {}
    user_type = choose_id_type(cfg.user_id_type, [s[USER_ID] for s in samples], existing.get(USER_ID))
    item_type = choose_id_type(cfg.item_id_type, [s[ITEM_ID] for s in samples], existing.get(ITEM_ID))
    min_us, max_us = time_bounds(cfg, now)
    plans = []
    for raw, sample in zip(raws, samples, strict=True):
        mode = choose_ts_mode(sample[TS], raw.spec.ts_unit)
        iso = choose_iso_format(sample[TS], cfg.timezone) if mode in ("iso", "mixed") else None
        plans.append(ParsePlan(user_type, item_type, mode, raw.spec.ts_unit, iso, cfg.timezone,
                               min_us, max_us))
    return plans


def _stage(raws: list[RawInput], plans: list[ParsePlan], config: Config, stage: Stage) -> None:
    """Parse + validate every file in the streaming engine and stage its rows bucketed by date.

    A reader with a fallback (fast NDJSON) that fails is replaced in ``raws`` by the robust one.
    """
    for i, plan in enumerate(plans):
        t0 = time.perf_counter()
        while True:
            raw = raws[i]
            try:
                stage.put(i, normalise(raw, plan, i, config.ingest.staging_buckets))
                break
            except Exception as exc:
                if raw.fallback is None:
                    raise IngestError(f"{raw.path}: failed while reading: {exc}") from exc
                logger.info("%s: fast reader failed (%s); reading line by line", raw.path,
                            str(exc).splitlines()[0])
                raws[i] = raw.fallback()
        logger.info("staged %s in %.1f s", raw.path, time.perf_counter() - t0)


def _write_quarantines(
    stage: Stage, raws: list[RawInput], reports: list[FileReport], last_rows: dict[int, int],
    config: Config, work: Path,
) -> None:
    for i, (raw, rep) in enumerate(zip(raws, reports, strict=True)):
        lf = stage.bucket(BUCKET_BAD, i)
        rows = pl.DataFrame(schema={"source": pl.String, "row": pl.Int64, "reason": pl.String,
                                    "raw": pl.String})
        if lf is not None:
            last = last_rows.get(i, -1)
            rows = lf.select(
                pl.lit(str(raw.path)).alias("source"),
                pl.col("_row").alias("row"),
                public_reason(pl.col("_reason"), pl.col("_row") == last).alias("reason"),
                pl.col("_raw").alias("raw"),
            ).collect()
            if raw.raw_lookup is not None:
                bad = rows["row"].implode()
                text = raw.raw_lookup.filter(pl.col("_row").is_in(bad)).collect()
                rows = rows.drop("raw").join(text.rename({"_row": "row", "_raw": "raw"}), on="row",
                                             how="left", maintain_order="left")
        counts = rows.group_by("reason").len().sort("reason")
        rep.quarantined = {r: int(n) for r, n in counts.iter_rows()}
        dest = write_quarantine(rows, config.paths.quarantine_dir, raw.path, work)
        rep.quarantine_file = None if dest is None else str(dest)


def _dedup(frame: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(one day's events sorted by user, ts, item; the rows of this run that were duplicates).

    Sorting on (_file, _row) last makes the order total, so the first copy in input order is kept
    (stored events, ``_file == -1``, come first in merge mode) and the output does not depend on how
    the engine scheduled the work. Copies are then adjacent: comparing each row with the one before
    finds them without hashing. (Sorting one day at a time is cheaper than sorting a staging bucket on
    the day too; measured, a stable sort on the three key columns is slower than this one.)
    """
    frame = frame.sort(_ORDER)
    first = pl.any_horizontal(pl.col(c).ne_missing(pl.col(c).shift(1)) for c in _KEY)
    frame = frame.with_columns(first.alias("_first"))
    dups = frame.filter(~pl.col("_first") & (pl.col("_file") >= 0))
    return frame.filter(pl.col("_first")), dups


def _per_file(files: pl.Series) -> list[tuple[int, int]]:
    """(input index, rows) from a ``_file`` column; stored events (``_file == -1``) are left out."""
    if files.is_empty():
        return []
    counts = np.bincount(files.to_numpy() + 1)[1:]
    return [(i, int(n)) for i, n in enumerate(counts) if n]


def _with_stored(frame: pl.DataFrame, events_dir: Path) -> pl.DataFrame:
    """Merge mode: prepend what the touched partitions already hold (``_file = -1``)."""
    stored = []
    for day in frame["_day"].unique().sort():
        old = partitions.read_partition(events_dir, day.isoformat())
        if old is not None:
            stored.append(old.select(EVENT_COLUMNS).with_columns(
                pl.lit(-1, dtype=pl.Int32).alias("_file"),
                pl.int_range(pl.len(), dtype=pl.Int64).alias("_row"),
                pl.lit(day).alias("_day"),
            ))
    if not stored:
        return frame
    return pl.concat([*stored, frame.select(*EVENT_COLUMNS, "_file", "_row", "_day")],
                     how="vertical_relaxed")


def _write_events(
    stage: Stage, reports: list[FileReport], config: Config, work: Path
) -> tuple[list[str], int]:
    """Write every touched date partition; (partition names, how many of them already existed).

    Partitions are written and committed on a background thread, in order, while the next date is
    sorted: a crash still leaves each partition old or new.
    """
    events_dir = config.paths.events_dir
    merge = config.ingest.partition_mode == "merge"
    written: list[str] = []
    existed = []
    with BackgroundWriter() as writer:
        for bucket in range(config.ingest.staging_buckets):
            lf = stage.bucket(bucket)
            if lf is None:
                continue
            frame = lf.select(*EVENT_COLUMNS, "_file", "_row", pl.col(TS).dt.date().alias("_day")).collect()
            stage.drop(bucket)
            if merge:
                frame = _with_stored(frame, events_dir)
            if frame["_day"].n_unique() == 1:  # the usual case: a bucket holds one date
                days = {(frame["_day"][0],): frame}
            else:
                days = frame.partition_by("_day", as_dict=True, maintain_order=True)
            del frame
            for (day,), part in sorted(days.items()):
                kept, dups = _dedup(part)
                for i, n in _per_file(dups["_file"]):
                    reports[i].duplicates += n
                for i, n in _per_file(kept["_file"]):
                    reports[i].events_written += n
                name = day.isoformat()
                existed.append(writer.submit(partitions.replace_partition, kept.select(EVENT_COLUMNS),
                                             events_dir, name, work))
                written.append(f"event_date={name}")
            logger.debug("bucket %d: %d partitions", bucket, len(days))
    return sorted(written), sum(f.result() for f in existed)


def _report(reports: list[FileReport], parts: list[str], plans: list[ParsePlan], config: Config,
            status: str, started: float) -> IngestReport:
    quarantined: dict[str, int] = {}
    for rep in reports:
        for reason, n in rep.quarantined.items():
            quarantined[reason] = quarantined.get(reason, 0) + n
    rows_in = sum(r.rows for r in reports)
    bad = sum(quarantined.values())
    return IngestReport(
        rows_in=rows_in,
        events_written=sum(r.events_written for r in reports),
        duplicates=sum(r.duplicates for r in reports),
        quarantined=dict(sorted(quarantined.items())),
        partitions=parts,
        bad_fraction=bad / rows_in if rows_in else 0.0,
        files=reports,
        events_dir=str(config.paths.events_dir),
        quarantine_dir=str(config.paths.quarantine_dir),
        partition_mode=config.ingest.partition_mode,
        user_id_type=_type_name(plans[0].user_type),
        item_id_type=_type_name(plans[0].item_type),
        status=status,
        seconds=round(time.perf_counter() - started, 3),
    )


def ingest_files(inputs: list[Path], config: Config, *, now: datetime | None = None,
                 in_memory_rows: int = IN_MEMORY_ROWS) -> IngestReport:
    """Ingest ``inputs`` into ``config.paths.events_dir``; bad rows go to ``quarantine_dir``.

    ``now`` fixes the upper time bound (``max_future_days``) for reproducible tests. Inputs estimated
    at no more than ``in_memory_rows`` rows in all are staged in memory, larger ones on disk (see
    :mod:`recsys.data.staging`; the output is the same).
    Raises :class:`IngestError` for file-level problems and when the bad fraction is too high (after
    writing the quarantine, without touching events; ``err.report`` then holds the counts).
    """
    started = time.perf_counter()
    if not inputs:
        raise IngestError("no input files given")
    events_dir = config.paths.events_dir
    with partitions.ingest_workspace(config.paths.data_root, events_dir) as work:
        raws = [scan_input(Path(p), config.ingest, work) for p in inputs]
        plans = _plans(raws, config, now)
        reports = [FileReport(str(r.path), r.spec.kind, r.spec.preset, p.ts_mode)
                   for r, p in zip(raws, plans, strict=True)]
        estimates = [r.rows_estimate for r in raws]
        in_memory = None not in estimates and sum(estimates) <= in_memory_rows  # type: ignore[arg-type]
        stage = Stage(work / "stage", in_memory)
        _stage(raws, plans, config, stage)
        stats = stage.file_stats()
        for i, rep in enumerate(reports):
            rep.rows, rep.blank_lines, _ = stats.get(i, (0, 0, None))
            if rep.rows == 0:
                raise IngestError(f"{rep.source}: empty input: no data rows")
        last_rows = {i: s[2] for i, s in stats.items()
                     if s[2] is not None and raws[i].ends_with_newline is not True}
        _write_quarantines(stage, raws, reports, last_rows, config, work)
        report = _report(reports, [], plans, config, "failed", started)
        limit = config.ingest.max_bad_fraction
        if report.bad_fraction > limit:
            raise IngestError(
                f"{report.n_quarantined} of {report.rows_in} rows ({report.bad_fraction:.2%}) are bad, "
                f"more than ingest.max_bad_fraction={limit:.2%}; events were not changed. Reasons: "
                f"{report.quarantined}; rejected rows are in {config.paths.quarantine_dir}",
                report,
            )
        t0 = time.perf_counter()
        parts, replaced = _write_events(stage, reports, config, work)
        logger.info("wrote %d partitions in %.1f s", len(parts), time.perf_counter() - t0)
        report = _report(reports, parts, plans, config, "ok", started)
        report.partitions_replaced = replaced
        report.save(events_dir.parent / REPORT_FILE)  # still under the lock: the last run's report wins
    logger.info("ingested %d rows: %d events, %d duplicates, %d quarantined, %d partitions",
                report.rows_in, report.events_written, report.duplicates, report.n_quarantined,
                len(parts))
    return report
