"""The events table: a Delta Lake table partitioned by event date (or month), read and committed here.

Why Delta: one ingest run is one commit (all its dates or none of them: a kill or a full disk leaves the
previous version), late events are appended without rewriting anything, an explicit replace removes
files in the same commit that adds their replacement, and every version stays readable, so a training
run can record "events version N" and be reproduced from it.

Ingest writes the Parquet files itself (sorted, de-duplicated, zstd, fsynced: the same bytes for the
same rows) and commits them with ``deltalake``'s transaction API. Readers never glob the folder: the
files of a version are listed from the log (:func:`active_files`), because files of uncommitted or
replaced data may still lie beside the live ones. A plain Parquet folder (flat or hive ``event_date=``),
e.g. one a test or another tool wrote, is still read as it is.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl

from recsys.data.workspace import write_parquet_durable
from recsys.schemas import EVENT_DATE

logger = logging.getLogger(__name__)

DELTA_LOG = "_delta_log"
EVENT_MONTH = "event_month"
PARTITION_COLUMNS = {"day": EVENT_DATE, "month": EVENT_MONTH}
RUN_KEY = "recsys.ingest_run"  # commit metadata: the run id, to tell committed files from orphans


def is_delta(events_dir: Path) -> bool:
    return (Path(events_dir) / DELTA_LOG).is_dir()


def open_table(events_dir: Path, version: int | None = None):  # -> deltalake.DeltaTable | None
    """The Delta table at ``events_dir`` (at ``version``), or None when there is none."""
    if not is_delta(events_dir):
        return None
    from deltalake import DeltaTable

    try:
        return DeltaTable(str(events_dir), version=version)
    except Exception as exc:
        raise ValueError(f"{events_dir}: cannot open the events table"
                         + ("" if version is None else f" at version {version}") + f": {exc}") from exc


def table_version(events_dir: Path) -> int | None:
    """Current version of the events table; None for a plain Parquet folder or no table."""
    table = open_table(events_dir)
    return None if table is None else int(table.version())


def partition_column(table) -> str:
    cols = list(table.metadata().partition_columns)
    return cols[0] if cols else EVENT_DATE


def period_of(day: datetime, column: str) -> str:
    """Partition value of a date: ``YYYY-MM-DD`` (day) or ``YYYY-MM`` (month)."""
    text = day.date().isoformat() if isinstance(day, datetime) else day.isoformat()
    return text[:7] if column == EVENT_MONTH else text


@dataclass
class TableFile:
    path: str  # relative to the table root
    size: int
    rows: int | None
    partition: str


def table_files(table) -> list[TableFile]:
    """The live files of a table version with their partition value and row count."""
    col = partition_column(table)
    actions = pl.DataFrame(table.get_add_actions(flatten=True))
    if actions.height == 0:
        return []
    rows = actions["num_records"] if "num_records" in actions.columns else [None] * actions.height
    part = f"partition.{col}"
    parts = actions[part] if part in actions.columns else [""] * actions.height
    return [TableFile(p, int(s), None if r is None else int(r), v or "")
            for p, s, r, v in zip(actions["path"], actions["size_bytes"], rows, parts, strict=True)]


def _legacy_files(events_dir: Path, before: datetime | None) -> list[Path]:
    files = sorted(p for p in events_dir.rglob("*.parquet")
                   if not any(part.startswith((".", "_")) for part in p.relative_to(events_dir).parts))
    if before is None:
        return files
    last = (before + timedelta(days=1)).date().isoformat()
    prefix = f"{EVENT_DATE}="
    return [f for f in files if not (f.parent.name.startswith(prefix) and f.parent.name[len(prefix):] > last)]


def active_files(events_dir: Path, before: datetime | None = None, version: int | None = None) -> list[Path]:
    """Parquet files holding the events (of ``version``; default the latest), sorted.

    With ``before``, partitions lying wholly after it are left out (one day of margin). Raises
    FileNotFoundError when there is no events folder.
    """
    events_dir = Path(events_dir)
    if not events_dir.is_dir():
        raise FileNotFoundError(f"events directory {events_dir} does not exist (run `recsys ingest` first)")
    table = open_table(events_dir, version)
    if table is None:
        if version is not None:
            raise ValueError(f"{events_dir} is not a Delta table: it has no version {version}")
        return _legacy_files(events_dir, before)
    col = partition_column(table)
    last = None if before is None else period_of(before + timedelta(days=1), col)
    return sorted(events_dir / f.path for f in table_files(table) if last is None or f.partition <= last)


def scan_events(events_dir: Path, version: int | None = None) -> pl.LazyFrame:
    """The events (contract columns only, no partition column) of a version as one lazy frame."""
    files = active_files(events_dir, version=version)
    if not files:
        raise FileNotFoundError(f"events directory {events_dir} holds no events")
    return pl.scan_parquet(files, hive_partitioning=False, missing_columns="insert", extra_columns="ignore")


def existing_schema(events_dir: Path) -> dict[str, pl.DataType] | None:
    """Schema of the stored events (ids keep their type across runs), or None."""
    try:
        files = active_files(events_dir)
    except FileNotFoundError:
        return None
    return dict(pl.read_parquet_schema(files[0])) if files else None


def write_file(frame: pl.DataFrame, path: Path) -> int:
    """Write and fsync one data file (deterministic settings: same frame -> same bytes); its size."""
    write_parquet_durable(frame, path)
    return path.stat().st_size


@dataclass
class PendingCommit:
    """Files written by one ingest run, committed together by :func:`commit`."""

    events_dir: Path
    run_id: str
    column: str
    adds: list[tuple[str, int, int, str]] = field(default_factory=list)  # (path, size, rows, partition)
    removes: list[TableFile] = field(default_factory=list)
    counter: int = 0

    def reserve(self, partition: str) -> str:
        """The path (relative to the table) of the run's next file in ``partition``."""
        rel = f"{self.column}={partition}/part-{self.run_id}-{self.counter:05d}.parquet"
        self.counter += 1
        return rel

    def write(self, frame: pl.DataFrame, rel: str, partition: str) -> None:
        """Write one reserved file (safe from several writer threads: one list append each)."""
        size = write_file(frame, self.events_dir / rel)
        self.adds.append((rel, size, frame.height, partition))


# Test hook: called with the events folder just before the commit (e.g. to raise OSError(ENOSPC)).
before_commit = None


def commit(pending: PendingCommit, schema: dict[str, pl.DataType], operation: dict[str, str]) -> int | None:
    """Commit the pending files (and removals) as one new table version; the version, or None if empty."""
    from deltalake import Schema
    from deltalake.transaction import (
        AddAction,
        CommitProperties,
        RemoveAction,
        create_table_with_add_actions,
    )

    if not pending.adds and not pending.removes:
        return None
    if before_commit is not None:
        before_commit(pending.events_dir)
    now = int(time.time() * 1000)
    col = pending.column
    adds = [AddAction(p, size, {col: part}, now, True, json.dumps({"numRecords": rows}))
            for p, size, rows, part in sorted(pending.adds)]  # written by several threads
    arrow_schema = pl.DataFrame(schema=schema).with_columns(pl.lit("", dtype=pl.String).alias(col)).to_arrow()
    delta_schema = Schema.from_arrow(arrow_schema.schema)
    props = CommitProperties(custom_metadata={RUN_KEY: pending.run_id, **operation})
    table = open_table(pending.events_dir)
    if table is None:
        create_table_with_add_actions(str(pending.events_dir), delta_schema, adds, mode="error",
                                      partition_by=[col], commit_properties=props)
    else:
        removes = [RemoveAction(f.path, True, now, f.size, {col: f.partition}) for f in pending.removes]
        table.create_write_transaction([*adds, *removes], mode="append", schema=delta_schema,
                                       partition_by=[col], commit_properties=props)
    return table_version(pending.events_dir)


def committed_runs(events_dir: Path) -> set[str]:
    table = open_table(events_dir)
    if table is None:
        return set()
    return {str(h[RUN_KEY]) for h in table.history() if h.get(RUN_KEY)}


def remove_run_files(events_dir: Path, run_id: str) -> int:
    """Delete the data files one (uncommitted) run wrote; how many."""
    n = 0
    for f in Path(events_dir).glob(f"*=*/part-{run_id}-*.parquet"):
        f.unlink(missing_ok=True)
        n += 1
    return n


def convert_legacy(events_dir: Path) -> None:
    """Turn a hive ``event_date=`` Parquet folder written by an older version into a Delta table."""
    from deltalake import Schema, convert_to_deltalake
    from deltalake.schema import Field, PrimitiveType

    logger.warning("converting the Parquet folder %s into a Delta table (version 0)", events_dir)
    convert_to_deltalake(str(events_dir), partition_by=Schema([Field(EVENT_DATE, PrimitiveType("string"))]),
                         partition_strategy="hive")
