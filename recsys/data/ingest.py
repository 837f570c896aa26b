"""Ingest: raw viewing logs -> validated, de-duplicated events in the Delta table ``events/``.

Steps (each reads only the previous one's output, so memory stays bounded by one date bucket, or by
the whole input when that is small):

1. open every input (``readers``): file-level problems (missing file or column, wrong column type,
   unreadable, empty) raise :class:`IngestError` before anything is written;
2. parse and validate each file in the streaming engine (``validate``) and stage the rows, split into
   ``ingest.staging_buckets`` buckets by event date (bad rows in their own bucket), in memory or on disk
   (``staging``);
3. write each input's rejected rows to a quarantine file in the work folder and stop with an error if
   the bad fraction is above ``ingest.max_bad_fraction`` (events are then left untouched);
4. per partition: sort by (user_id, ts, item_id), drop duplicates (same user, item, ts: the first in
   input order is kept; stored events first) and write the new events as files of the table;
5. commit every file of the run as **one** table version (``events_table``), then publish the
   quarantine files and the report. A failure or a kill before the commit changes nothing; the next run
   deletes the files an uncommitted run left.

Partition policy (``ingest.partition_mode``): ``merge`` (default) appends only events the table does not
hold yet: a late event for yesterday is added and nothing is deleted, and re-ingesting a file adds
nothing (idempotent). ``replace`` (``recsys ingest --replace``) makes the run's rows the whole content of
every partition they touch, in the same commit; the report names each replaced partition and how many
events it held.

Conservation: every input data row is counted exactly once as an event written, a duplicate, or a
quarantined row (blank lines are not rows; they are counted separately).
"""

from __future__ import annotations

import errno
import json
import logging
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.config import Config
from recsys.data import events_table
from recsys.data.background import BackgroundWriter
from recsys.data.errors import IngestError
from recsys.data.quarantine import StagedQuarantine, stage_quarantine
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
from recsys.data.workspace import ingest_workspace
from recsys.schemas import EVENT_TYPE, ITEM_ID, TS, TS_DTYPE, USER_ID, WATCH_SECONDS

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
    replaced: dict[str, int] = field(default_factory=dict)  # replace mode: partition -> events it held
    table_version: int | None = None  # events table version after this run (lineage)
    partition_by: str = "day"
    run_id: str = ""
    status: str = "ok"
    seconds: float = 0.0

    @property
    def partitions_replaced(self) -> int:
        return len(self.replaced)

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
    existing = events_table.existing_schema(config.paths.events_dir) or {}
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


def _stage_quarantines(
    stage: Stage, raws: list[RawInput], reports: list[FileReport], last_rows: dict[int, int],
    config: Config, work: Path,
) -> list[StagedQuarantine]:
    staged = []
    seen: dict[Path, int] = {}
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
        key = raw.path.resolve()
        occurrence = seen.get(key, 0)
        seen[key] = occurrence + 1
        q = stage_quarantine(rows, config.paths.quarantine_dir, raw.path, occurrence, work)
        rep.quarantine_file = None if q.tmp is None else str(q.dest)
        staged.append(q)
    for q in staged:
        q.occurrences = seen[q.source.resolve()]
    return staged


def _publish_quarantines(staged: list[StagedQuarantine]) -> None:
    for q in staged:
        q.publish(q.occurrences)


def _dedup(frame: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(events sorted by user, ts, item; the rows of this run that were duplicates).

    Sorting on (_file, _row) last makes the order total, so the first copy in input order is kept
    (stored events, ``_file == -1``, come first) and the output does not depend on how the engine
    scheduled the work. Copies are then adjacent: comparing each row with the one before finds them
    without hashing.
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


@dataclass
class _Target:
    """What the run writes into: the table's partition column and its live files per partition."""

    column: str
    files: dict[str, list[events_table.TableFile]]
    schema: dict[str, pl.DataType]


def _with_stored(frame: pl.DataFrame, target: _Target, events_dir: Path) -> pl.DataFrame:
    """Merge: prepend the stored events of the same days (``_file = -1``) so copies of them are found."""
    files = [events_dir / f.path for name in frame["_part"].unique().to_list()
             for f in target.files.get(name, [])]
    if not files:
        return frame
    days = frame["_day"].unique().implode()
    stored = (pl.scan_parquet(files, hive_partitioning=False, missing_columns="insert",
                              extra_columns="ignore")
              .select(EVENT_COLUMNS)
              .with_columns(pl.col(TS).dt.date().alias("_day"))
              .filter(pl.col("_day").is_in(days))
              .collect())
    if stored.height == 0:
        return frame
    stored = stored.with_columns(pl.lit(-1, dtype=pl.Int32).alias("_file"),
                                 pl.int_range(pl.len(), dtype=pl.Int64).alias("_row"),
                                 _partition_expr(target.column))
    return pl.concat([stored.select(frame.columns), frame], how="vertical_relaxed")


def _partition_expr(column: str) -> pl.Expr:
    fmt = "%Y-%m" if column == events_table.EVENT_MONTH else "%Y-%m-%d"
    return pl.col(TS).dt.strftime(fmt).alias("_part")


def _new_events(unit: pl.DataFrame, target: _Target, events_dir: Path, merge: bool,
                reports: list[FileReport]) -> dict[tuple[str], pl.DataFrame]:
    """De-duplicate one unit of staged rows (against the stored events in merge mode); the events to
    write per partition, in the table's schema, and the counts added to ``reports``."""
    frame = _with_stored(unit, target, events_dir) if merge else unit
    stored = frame.height > unit.height
    kept, dups = _dedup(frame)
    del frame
    for i, n in _per_file(dups["_file"]):
        reports[i].duplicates += n
    new = kept.filter(pl.col("_file") >= 0) if stored else kept
    del kept
    for i, n in _per_file(new["_file"]):
        reports[i].events_written += n
    if new.height == 0:
        return {}
    new = new.select(*[pl.col(c).cast(t) for c, t in target.schema.items()], "_part")
    if new["_part"].n_unique() == 1:
        return {(new["_part"][0],): new.drop("_part")}
    return new.partition_by("_part", as_dict=True, maintain_order=True, include_key=False)


HELD_ROWS = 2_000_000  # month partitions: rows gathered across buckets before they are written


def _flush(held: dict[str, list[pl.DataFrame]], writer: BackgroundWriter,
           pending: events_table.PendingCommit) -> None:
    """Write each gathered month as one file (copies never span buckets: they share a day)."""
    for name in sorted(held):
        frames = held.pop(name)
        out = frames[0] if len(frames) == 1 else pl.concat(frames).sort(_KEY, maintain_order=True)
        writer.submit(pending.add, out, name)


def _write_events(stage: Stage, reports: list[FileReport], config: Config, target: _Target,
                  pending: events_table.PendingCommit) -> dict[str, int]:
    """Write the run's files (not yet committed); {replaced partition: events it held}.

    merge: only events not already stored are written, in new files; nothing is rewritten or removed.
    replace: every partition the run touches is replaced by the run's rows (its old files removed in
    the same commit). Files are written on a background thread while the next bucket is sorted.
    """
    events_dir = config.paths.events_dir
    merge = config.ingest.partition_mode == "merge"
    replaced: dict[str, int] = {}
    held: dict[str, list[pl.DataFrame]] = {}
    n_held = 0
    with BackgroundWriter() as writer:
        for bucket in range(config.ingest.staging_buckets):
            lf = stage.bucket(bucket)
            if lf is None:
                continue
            frame = lf.select(*EVENT_COLUMNS, "_file", "_row", pl.col(TS).dt.date().alias("_day"),
                              _partition_expr(target.column)).collect()
            stage.drop(bucket)
            # day partitions: one sort per day (a bucket may hold several); month: one per bucket
            # (copies share a day, so they never span buckets)
            if target.column == events_table.EVENT_DATE and frame["_part"].n_unique() > 1:
                units = [u for _, u in sorted(frame.partition_by("_part", as_dict=True,
                                                                 maintain_order=True).items())]
            else:
                units = [frame]
            del frame
            parts: dict[tuple[str], pl.DataFrame] = {}
            for unit in units:
                for key, out in _new_events(unit, target, events_dir, merge, reports).items():
                    parts[key] = out
            del units
            if not merge:
                for (name,) in set(parts) - {(r,) for r in replaced}:
                    old = target.files.get(name, [])
                    pending.removes += old
                    replaced[name] = sum(f.rows or 0 for f in old)
            for (name,), out in sorted(parts.items()):
                if target.column == events_table.EVENT_DATE:
                    writer.submit(pending.add, out, name)
                else:  # a month spans buckets: gather it, one file per month (flushed if large)
                    held.setdefault(name, []).append(out)
                    n_held += out.height
            logger.debug("bucket %d: %d partitions", bucket, len(parts))
            if n_held > HELD_ROWS:
                _flush(held, writer, pending)
                n_held = 0
        _flush(held, writer, pending)
    return {k: v for k, v in sorted(replaced.items()) if target.files.get(k)}


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


_RUN_FILE = re.compile(r"part-([0-9a-f]{12})-\d+\.parquet$")
MONTH_AFTER_DAYS = 366  # auto granularity: month when a new table's first run spans more days than this
MONTH_BELOW_PER_DAY = 10_000  # ... and holds fewer events per day than this on average


def _remove_orphans(events_dir: Path) -> None:
    """Delete data files of runs that never committed (killed, or failed on a full disk)."""
    if not events_dir.is_dir():
        return
    runs = {m.group(1) for f in events_dir.glob("*=*/part-*.parquet") if (m := _RUN_FILE.search(f.name))}
    table = events_table.open_table(events_dir)
    if table is not None:  # runs with live files committed; the log's history only for the others
        runs -= {m.group(1) for f in events_table.table_files(table) if (m := _RUN_FILE.search(f.path))}
    if not runs:
        return
    for run in sorted(runs - events_table.committed_runs(events_dir)):
        n = events_table.remove_run_files(events_dir, run)
        logger.warning("removed %d uncommitted file(s) of interrupted ingest run %s", n, run)


def _granularity(stage: Stage, config: Config) -> str:
    """The partition column of a new table: ``ingest.partition_by``, or chosen from the data's span."""
    setting = config.ingest.partition_by
    if setting != "auto":
        return events_table.PARTITION_COLUMNS[setting]
    lo = hi = None
    n = 0
    for bucket in range(config.ingest.staging_buckets):
        lf = stage.bucket(bucket)
        if lf is None:
            continue
        b_lo, b_hi, b_n = lf.select(pl.col(TS).min().alias("lo"), pl.col(TS).max().alias("hi"),
                                       pl.len()).collect().row(0)
        lo = b_lo if lo is None else min(lo, b_lo)
        hi = b_hi if hi is None else max(hi, b_hi)
        n += b_n
    if lo is None:
        return events_table.EVENT_DATE
    days = (hi - lo).days + 1
    month = days > MONTH_AFTER_DAYS and n / days < MONTH_BELOW_PER_DAY
    return events_table.EVENT_MONTH if month else events_table.EVENT_DATE


def _target(stage: Stage, config: Config, plans: list[ParsePlan]) -> _Target:
    events_dir = config.paths.events_dir
    table = events_table.open_table(events_dir)
    schema = {USER_ID: plans[0].user_type, ITEM_ID: plans[0].item_type, TS: TS_DTYPE,
              WATCH_SECONDS: pl.Float64, EVENT_TYPE: pl.String}
    if table is None:
        return _Target(_granularity(stage, config), {}, schema)
    column = events_table.partition_column(table)
    wanted = config.ingest.partition_by
    if wanted != "auto" and events_table.PARTITION_COLUMNS[wanted] != column:
        raise IngestError(f"{events_dir}: the events table is partitioned by {column}, not by {wanted}; "
                          "set ingest.partition_by=auto (or to the table's granularity)")
    files: dict[str, list[events_table.TableFile]] = {}
    for f in events_table.table_files(table):
        files.setdefault(f.partition, []).append(f)
    return _Target(column, files, schema)


def _is_disk_full(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "no space left" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def _write_failed(exc: BaseException, events_dir: Path, version: int | None) -> IngestError:
    state = ("no events table was created" if version is None
             else f"the events table is still at version {version}")
    if _is_disk_full(exc):
        return IngestError(f"{events_dir}: no space left on device while ingesting; nothing was "
                           f"changed ({state}, quarantine and report untouched)")
    first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
    return IngestError(f"{events_dir}: writing events failed ({type(exc).__name__}: {first}); nothing "
                       f"was changed ({state})")


def ingest_files(inputs: list[Path], config: Config, *, now: datetime | None = None,
                 in_memory_rows: int = IN_MEMORY_ROWS) -> IngestReport:
    """Ingest ``inputs`` into the events table at ``config.paths.events_dir`` as one commit.

    A full disk at any step before the commit (staging, quarantine, data files, commit) is one
    :class:`IngestError` line naming the folder and saying that nothing was changed.
    """
    events_dir = config.paths.events_dir
    before = events_table.table_version(events_dir) if events_dir.is_dir() else None
    try:
        return _ingest(inputs, config, now, in_memory_rows)
    except (IngestError, OSError, pl.exceptions.PolarsError) as exc:
        if not _is_disk_full(exc) or "no space left on device while" in str(exc):
            raise
        where = config.paths.data_root
        raise _write_failed(exc, where, before) from exc


def _ingest(inputs: list[Path], config: Config, now: datetime | None, in_memory_rows: int) -> IngestReport:
    """Ingest ``inputs`` into the events table at ``config.paths.events_dir`` as one commit.

    ``now`` fixes the upper time bound (``max_future_days``) for reproducible tests. Inputs estimated
    at no more than ``in_memory_rows`` rows in all are staged in memory, larger ones on disk (see
    :mod:`recsys.data.staging`; the output is the same).
    Raises :class:`IngestError` for file-level problems, when the bad fraction is too high (after
    writing the quarantine, without touching events; ``err.report`` then holds the counts) and when
    writing fails (a full disk): then nothing was changed.
    """
    started = time.perf_counter()
    if not inputs:
        raise IngestError("no input files given")
    events_dir = config.paths.events_dir
    with ingest_workspace(config.paths.data_root) as work:
        _remove_orphans(events_dir)
        if events_dir.is_dir() and not events_table.is_delta(events_dir) and any(
                events_dir.glob("event_date=*/*.parquet")):
            events_table.convert_legacy(events_dir)
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
        quarantines = _stage_quarantines(stage, raws, reports, last_rows, config, work)
        report = _report(reports, [], plans, config, "failed", started)
        limit = config.ingest.max_bad_fraction
        if report.bad_fraction > limit:
            _publish_quarantines(quarantines)
            raise IngestError(
                f"{report.n_quarantined} of {report.rows_in} rows ({report.bad_fraction:.2%}) are bad, "
                f"more than ingest.max_bad_fraction={limit:.2%}; events were not changed. Reasons: "
                f"{report.quarantined}; rejected rows are in {config.paths.quarantine_dir}",
                report,
            )
        t0 = time.perf_counter()
        before = events_table.table_version(events_dir)
        pending = None
        try:
            target = _target(stage, config, plans)
            pending = events_table.PendingCommit(events_dir, uuid.uuid4().hex[:12], target.column)
            replaced = _write_events(stage, reports, config, target, pending)
            version = events_table.commit(pending, target.schema, {
                "recsys.mode": config.ingest.partition_mode,
                "recsys.inputs": json.dumps([str(p) for p in inputs])[:2000],
            })
        except IngestError:
            raise
        except BaseException as exc:
            if pending is not None:
                events_table.remove_run_files(events_dir, pending.run_id)
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise _write_failed(exc, events_dir, before) from exc
        logger.info("wrote %d files in %.1f s -> version %s", len(pending.adds), time.perf_counter() - t0,
                    version)
        _publish_quarantines(quarantines)
        parts = sorted({f"{target.column}={part}" for *_, part in pending.adds} |
                       {f"{target.column}={p}" for p in replaced})
        report = _report(reports, parts, plans, config, "ok", started)
        report.replaced = replaced
        report.table_version = version if version is not None else before
        report.partition_by = "month" if target.column == events_table.EVENT_MONTH else "day"
        report.run_id = pending.run_id
        try:
            report.save(events_dir.parent / REPORT_FILE)  # under the lock: the last run's report wins
        except OSError as exc:  # after the commit: the events did change, say so
            raise IngestError(f"{events_dir.parent / REPORT_FILE}: events were committed as version "
                              f"{report.table_version}, but the report could not be written: {exc}") from exc
    logger.info("ingested %d rows: %d events, %d duplicates, %d quarantined, %d partitions, version %s",
                report.rows_in, report.events_written, report.duplicates, report.n_quarantined,
                len(parts), report.table_version)
    return report
