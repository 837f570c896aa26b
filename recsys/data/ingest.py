"""Ingest: raw viewing logs -> validated, de-duplicated events in the Delta table ``events/``.

Steps (each reads only the previous one's output, so memory stays bounded by one date bucket, or by
the whole input when that is small):

1. open every input (``readers``): file-level problems (missing file or column, wrong column type,
   unreadable, empty) raise :class:`IngestError` before anything is written;
2. parse and validate each file in the streaming engine (``validate``) and stage the rows in memory, or
   on disk split into ``ingest.staging_buckets`` buckets by event date (bad rows apart) (``staging``);
3. write each input's rejected rows to a quarantine file in the work folder and stop with an error if
   the bad fraction is above ``ingest.max_bad_fraction`` (events are then left untouched);
4. per partition: sort by (user_id, ts, item_id), drop duplicates (same user, item, ts: the first in
   input order is kept; an event already stored wins) and write the new events as files of the table
   (``events_write``);
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
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl

from recsys.config import Config
from recsys.data import events_table, events_write
from recsys.data.errors import IngestError
from recsys.data.quarantine import StagedQuarantine, stage_quarantine
from recsys.data.readers import RawInput, scan_input
from recsys.data.staging import IN_MEMORY_ROWS, Stage
from recsys.data.validate import (
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
from recsys.schemas import ITEM_ID, TS, USER_ID

__all__ = ["IngestError", "IngestReport", "FileReport", "ingest_files", "REPORT_FILE"]

logger = logging.getLogger(__name__)

REPORT_FILE = "ingest_report.json"


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


def _rejected(stage: Stage, raws: list[RawInput], last_rows: dict[int, int]) -> list[pl.DataFrame]:
    """Per input, its rejected rows as quarantine rows (source, row, reason, raw).

    Parquet rows get their raw text (the row as JSON) from ``raw_lookup``: one more read of each file,
    run for all files at once (``collect_all`` reads them in parallel).
    """
    empty = pl.DataFrame(schema={"source": pl.String, "row": pl.Int64, "reason": pl.String, "raw": pl.String})
    out = []
    lookups: dict[int, pl.LazyFrame] = {}
    for i, raw in enumerate(raws):
        lf = stage.bad(i)
        if lf is None:
            out.append(empty)
            continue
        out.append(lf.select(
            pl.lit(str(raw.path)).alias("source"),
            pl.col("_row").alias("row"),
            public_reason(pl.col("_reason"), pl.col("_row") == last_rows.get(i, -1)).alias("reason"),
            pl.col("_raw").alias("raw"),
        ).collect())
        if raw.raw_lookup is not None:
            lookups[i] = raw.raw_lookup.filter(pl.col("_row").is_in(out[i]["row"].implode()))
    for i, text in zip(lookups, pl.collect_all(list(lookups.values())), strict=True):
        out[i] = out[i].drop("raw").join(text.rename({"_row": "row", "_raw": "raw"}), on="row", how="left",
                                         maintain_order="left")
    return out


def _stage_quarantines(
    stage: Stage, raws: list[RawInput], reports: list[FileReport], last_rows: dict[int, int],
    config: Config, work: Path,
) -> list[StagedQuarantine]:
    staged = []
    seen: dict[Path, int] = {}
    for raw, rep, rows in zip(raws, reports, _rejected(stage, raws, last_rows), strict=True):
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
        events_write.remove_orphans(events_dir)
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
            target = events_write.target(stage, config, plans[0].user_type, plans[0].item_type)
            pending = events_table.PendingCommit(events_dir, uuid.uuid4().hex[:12], target.column)
            written = events_write.write_events(stage, config, target, pending)
            replaced = written.replaced
            for i, rep in enumerate(reports):
                rep.events_written = written.events.get(i, 0)
                rep.duplicates = written.duplicates.get(i, 0)
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
