"""Validated, atomic publication of a recommendations export.

Layout under ``paths.exports_dir``::

    recs/run_date=YYYY-MM-DD/part-0.parquet   long format (the contract), + _manifest.json
    recs_wide/run_date=YYYY-MM-DD/...          optional: one row per user (item and score lists)
    recs_csv/run_date=YYYY-MM-DD/recs.csv      optional: the long format as CSV
    _staging/                                  work area: temporary and replaced folders
    _locks/                                    one lock file per run date being published

Why this shape:

* A partition folder is written complete in ``_staging/`` (same file system, outside every dataset root
  so that a reader scanning ``recs/`` never sees half-written files), fsynced, ``_manifest.json`` written
  last, and only then moved into place with one ``rename``. Replacing an existing partition swaps the two
  folders atomically (Linux ``renameat2(RENAME_EXCHANGE)``); elsewhere it falls back to
  rename-old-away / rename-new-in, and the next run restores the old folder if a crash hit between the
  two renames. A kill -9 at any moment therefore leaves the previous complete partition or the new
  complete one visible, never a mix.
* Readers must treat a ``run_date=`` folder without ``_manifest.json`` as incomplete (``read_recs`` does)
  and read with a glob, ``recs/run_date=*/*.parquet``: the manifest is not Parquet.
* Nothing is written when validation fails; the error lists every failed check.
* Two runs publishing the same run date take turns: a lock file per date in ``_locks/`` is held from
  recovery to the last rename, so one run's recovery never deletes the other's live staging folder,
  and whatever recovery finds was left by a process that died (the lock dies with it).

The CSV and wide variants live in sibling roots (not inside the Parquet partition) because a directory
scan in polars/pyarrow would otherwise mix file types and schemas. They are published before the long
format; the long format's manifest is the marker that the whole run is complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.schemas import (
    ITEM_ID,
    MANIFEST_FILE,
    MODEL_NAME,
    MODEL_VERSION,
    RANK,
    RECS_SCHEMA,
    RUN_DATE,
    SCORE,
    SOURCE,
    USER_ID,
)

log = logging.getLogger(__name__)

RECS_DATASET = "recs"
WIDE_DATASET = "recs_wide"
CSV_DATASET = "recs_csv"
STAGING = "_staging"
LOCKS = "_locks"  # one lock file per run date: publications of one date take turns
DATA_FILE = "part-0.parquet"
CSV_FILE = "recs.csv"
# OWASP CSV-injection rule: a cell a spreadsheet would read as a formula gets a leading quote.
FORMULA_START = r"^[=+\-@\t\r]"
LONG_COLUMNS = [USER_ID, RANK, ITEM_ID, SCORE, SOURCE, MODEL_NAME, MODEL_VERSION, RUN_DATE]
TITLE = "title"  # optional last column: the catalogue title of item_id (recsys.data.catalogue)
SOURCES = ("model", "continuation", "popular")


class ExportValidationError(ValueError):
    """The export failed a check; nothing was published. The message lists every failure."""


@dataclass
class RecsChecks:
    """What the validation needs to know beyond the frame itself."""

    top_k: int
    requested_users: pl.Series | None = None  # every one must have at least one row
    excluded_items: pl.Series | None = None  # original ids that must not appear
    seen: pl.DataFrame | None = None  # (user_id, item_id) pairs that must not appear (the policy's)


@dataclass
class PublishResult:
    path: Path  # the published long-format partition
    extra_paths: dict[str, Path] = field(default_factory=dict)  # wide / csv partitions
    timings: dict[str, float] = field(default_factory=dict)


# --- validation ------------------------------------------------------------------------------------


def validate_recs(recs: pl.DataFrame, checks: RecsChecks) -> list[str]:
    """Every way ``recs`` breaks the export contract, as readable messages (empty list: valid)."""
    missing = [c for c in LONG_COLUMNS if c not in recs.columns]
    if missing:
        return [f"missing columns {missing}"]
    errors: list[str] = []
    for name, dtype in RECS_SCHEMA.items():
        if recs.schema[name] != dtype:
            errors.append(f"column {name} has type {recs.schema[name]}, expected {dtype}")
    nulls = {c: n for c, n in recs.null_count().row(0, named=True).items() if n}
    if nulls:
        errors.append(f"null values in {nulls}")
    if errors:
        return errors

    if not recs[USER_ID].is_sorted():  # the scorer writes users in order; anything else is sorted here
        recs = recs.sort(USER_ID, RANK, maintain_order=True)
    users, n = recs[USER_ID], recs.height
    starts = np.flatnonzero((users != users.shift(1)).fill_null(True).to_numpy())  # [R] first row per user
    lengths = np.diff(np.r_[starts, n])  # [R]
    index_type = np.int32 if n < 2**31 else np.int64
    expected = np.arange(1, n + 1, dtype=index_type) - np.repeat(starts.astype(index_type), lengths)  # [n]
    bad_rows = np.flatnonzero(recs[RANK].to_numpy() != expected)
    if len(bad_rows):
        runs = np.unique(np.searchsorted(starts, bad_rows, side="right") - 1)
        errors.append(f"ranks not contiguous 1..n for {len(runs)} users "
                      f"(e.g. {_sample(users.gather(starts[runs]))})")
    if len(lengths) and lengths.max() > checks.top_k:
        errors.append(f"{int((lengths > checks.top_k).sum())} users have more than top_k={checks.top_k} rows")

    dup_runs = _duplicate_runs(recs, starts, lengths)
    if len(dup_runs):
        errors.append(f"(user_id, item_id) not unique for {len(dup_runs)} users "
                      f"(e.g. user {_sample(users.gather(starts[dup_runs]))})")

    if not recs[SCORE].is_finite().all():
        errors.append("non-finite scores (an excluded or masked item was ranked)")
    bad_source = recs.filter(~pl.col(SOURCE).is_in(SOURCES))
    if bad_source.height:
        errors.append(f"unknown source values {_sample(bad_source[SOURCE].unique())}")

    if checks.excluded_items is not None and len(checks.excluded_items):
        excluded = checks.excluded_items.cast(recs.schema[ITEM_ID], strict=False).drop_nulls()
        hits = recs.filter(pl.col(ITEM_ID).is_in(excluded.implode()))
        if hits.height:
            errors.append(f"{hits.height} rows recommend an excluded item (e.g. {_sample(hits[ITEM_ID])})")

    if checks.requested_users is not None:
        requested = checks.requested_users.rename(USER_ID).unique().to_frame()
        absent = requested.join(users.gather(starts).to_frame(), on=USER_ID, how="anti")
        if absent.height:
            errors.append(f"{absent.height} requested users have no recommendations "
                          f"(e.g. {_sample(absent[USER_ID])})")

    if checks.seen is not None and checks.seen.height:
        seen_hits = _seen_hits(recs, checks.seen)
        if seen_hits.height:
            errors.append(f"{seen_hits.height} rows recommend an item the user already watched "
                          f"(e.g. user {_sample(seen_hits[USER_ID])})")
    return errors


# Hash-based pre-filters: polars' hash joins and group-bys need ~150 B/row (3 GB at 20M rows); 64-bit keys
# in numpy need ~30 B/row. Every key match is confirmed exactly on the few rows it selects, so a hash
# collision can cost a little time but never a wrong verdict.
_MIX = np.uint64(0x9E3779B97F4A7C15)


def _pair_keys(users: pl.Series, items: pl.Series) -> np.ndarray:
    """One 64-bit key per (user, item) row [n] uint64."""
    return users.hash(seed=11).to_numpy() * _MIX + items.hash(seed=13).to_numpy()  # wraps mod 2**64


def _duplicate_runs(recs: pl.DataFrame, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices of users (runs of rows) that list an item twice."""
    keys = np.array(recs[ITEM_ID].hash(seed=13).to_numpy())  # [n] own writable copy
    candidates = []
    for width in np.unique(lengths[lengths > 1]):
        runs = np.flatnonzero(lengths == width)
        if len(runs) == len(lengths):
            block = keys.reshape(-1, width)  # [R, width]: every user has the same number of rows
        else:
            block = keys[starts[runs][:, None] + np.arange(width)]  # [r, width]
        block.sort(axis=1)
        candidates.append(runs[(block[:, 1:] == block[:, :-1]).any(axis=1)])
    runs = np.concatenate(candidates) if candidates else np.empty(0, dtype=np.int64)
    if not len(runs):
        return runs
    rows = np.concatenate([np.arange(starts[r], starts[r] + lengths[r]) for r in runs])
    sub = recs[rows].select(USER_ID, ITEM_ID)
    confirmed = sub.filter(pl.struct(USER_ID, ITEM_ID).is_duplicated())[USER_ID].unique()
    return runs[recs[USER_ID].gather(starts[runs]).is_in(confirmed.implode()).to_numpy()]


def _seen_hits(recs: pl.DataFrame, seen: pl.DataFrame) -> pl.DataFrame:
    """Rows of ``recs`` whose (user_id, item_id) pair is in ``seen``."""
    seen = seen.select(
        pl.col(USER_ID).cast(recs.schema[USER_ID], strict=False),
        pl.col(ITEM_ID).cast(recs.schema[ITEM_ID], strict=False),
    ).drop_nulls()
    if not seen.height:
        return recs.clear()
    seen_keys = pl.Series(_pair_keys(seen[USER_ID], seen[ITEM_ID]))  # [m]
    keys = pl.Series(_pair_keys(recs[USER_ID], recs[ITEM_ID]))  # [n]
    rows = np.flatnonzero(keys.is_in(seen_keys.implode()).to_numpy())  # hash set of m keys
    if not len(rows):
        return recs.clear()
    seen_rows = seen.filter(seen_keys.is_in(keys.gather(rows).implode()))  # the few pairs to compare exactly
    return recs[rows].join(seen_rows.unique(), on=[USER_ID, ITEM_ID], how="semi")


def _sample(values: pl.Series, n: int = 3) -> str:
    return ", ".join(repr(v) for v in values.head(n).to_list())


# --- paths and readers -----------------------------------------------------------------------------


def partition_dir(exports_dir: Path, run_date: date, dataset: str = RECS_DATASET) -> Path:
    return Path(exports_dir) / dataset / f"{RUN_DATE}={run_date.isoformat()}"


def is_complete(run_dir: Path) -> bool:
    """A partition counts only once its manifest exists (written last)."""
    return (Path(run_dir) / MANIFEST_FILE).is_file()


def read_manifest(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / MANIFEST_FILE).read_text())


def csv_safe(frame: pl.DataFrame) -> pl.DataFrame:
    """Text columns with a ``'`` before cells starting with = + - @ (tab, CR), for recs.csv only: the
    Parquet export keeps the raw ids, a spreadsheet opening the CSV never runs a formula from an id."""
    return frame.with_columns(
        pl.when(pl.col(c).str.contains(FORMULA_START)).then("'" + pl.col(c)).otherwise(pl.col(c)).alias(c)
        for c, t in frame.schema.items() if t == pl.String
    )


def complete_partitions(exports_dir: Path, dataset: str = RECS_DATASET) -> list[Path]:
    """Complete ``run_date=`` folders of a dataset, oldest first (folders without a manifest skipped)."""
    root = Path(exports_dir) / dataset
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"{RUN_DATE}=*") if p.is_dir() and is_complete(p))


def read_recs(exports_dir: Path, run_date: date | None = None) -> pl.LazyFrame:
    """Long-format recommendations from complete partitions only (one run_date, or all)."""
    parts = complete_partitions(exports_dir)
    if run_date is not None:
        parts = [p for p in parts if p == partition_dir(exports_dir, run_date)]
    if not parts:
        raise FileNotFoundError(f"no complete export under {Path(exports_dir) / RECS_DATASET}"
                                + (f" for run_date={run_date}" if run_date else ""))
    # partitions written with and without the optional title column read as one frame (null titles)
    return pl.concat([pl.scan_parquet(p / DATA_FILE) for p in parts], how="diagonal_relaxed")


# --- snapshot hash ---------------------------------------------------------------------------------


def snapshot_hash(files: Iterable[Path], content_files: Iterable[Path] = ()) -> str:
    """Fingerprint of the inputs: name, size and mtime of ``files`` (cheap for large event sets) plus the
    full content of ``content_files`` (small lists such as a users file)."""
    h = hashlib.sha256()
    for f in sorted(Path(p) for p in files):
        st = f.stat()
        h.update(f"{f.as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for f in content_files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()


# --- crash points (tests replace this to simulate a kill at each step) ------------------------------


def _crash_point(name: str) -> None:
    """No-op in production; tests raise here to leave the disk exactly as a kill -9 at this step would."""


# --- atomic folder swap ----------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2). False where the system cannot do it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, f"renameat2 exchange {a} <-> {b}: {os.strerror(err)}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _staging_root(exports_dir: Path) -> Path:
    return Path(exports_dir) / STAGING


def _stage_prefix(dataset: str, run_date: date) -> str:
    return f"{dataset}.{RUN_DATE}={run_date.isoformat()}"


@contextlib.contextmanager
def publishing(exports_dir: Path, run_date: date) -> Iterator[None]:
    """Exclusive between processes for one run date's publication (waits for a concurrent one)."""
    locks = Path(exports_dir) / LOCKS
    locks.mkdir(parents=True, exist_ok=True)
    with (locks / f"{RUN_DATE}={run_date.isoformat()}.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def recover(exports_dir: Path, dataset: str, run_date: date) -> list[str]:
    """Undo what a crashed run left for this dataset and date; returns what was done.

    A previous partition moved away (fallback rename path) with no partition in place is restored;
    every other leftover temporary or replaced folder is deleted. Call it under :func:`publishing`
    (publish_recs does): only then is every leftover certainly a dead process's.
    """
    staging = _staging_root(exports_dir)
    target = partition_dir(exports_dir, run_date, dataset)
    done: list[str] = []
    if not staging.is_dir():
        return done
    prefix = _stage_prefix(dataset, run_date)
    leftovers = sorted(p for p in staging.iterdir() if p.name.startswith(prefix + "."))
    if not target.exists():
        for old in (p for p in leftovers if ".old-" in p.name and is_complete(p)):
            os.rename(old, target)
            _fsync_dir(target.parent)
            done.append(f"restored {target.name} from {old.name}")
            leftovers.remove(old)
            break
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)
        done.append(f"removed stale {p.name}")
    for line in done:
        log.warning("export recovery (%s): %s", dataset, line)
    return done


def _swap_into_place(stage: Path, target: Path, staging: Path, prefix: str, exchange: bool = True) -> None:
    """Make the complete ``stage`` folder visible at ``target`` in one step, replacing any old one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.rename(stage, target)
        _crash_point("renamed_in")
        _fsync_dir(target.parent)
        return
    if exchange and _exchange(stage, target):
        _crash_point("exchanged")  # target is new; stage path now holds the old partition
        _fsync_dir(target.parent)
        shutil.rmtree(stage)
        return
    old = staging / f"{prefix}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    _crash_point("renamed_away")
    os.rename(stage, target)
    _crash_point("renamed_in")
    _fsync_dir(target.parent)
    shutil.rmtree(old)


def _retire(exports_dir: Path, dataset: str, run_date: date) -> None:
    """Take a partition out of view in one rename, then delete it."""
    target = partition_dir(exports_dir, run_date, dataset)
    if target.exists():
        staging = _staging_root(exports_dir)
        staging.mkdir(parents=True, exist_ok=True)
        gone = staging / f"{_stage_prefix(dataset, run_date)}.retired-{uuid.uuid4().hex[:8]}"
        os.rename(target, gone)
        shutil.rmtree(gone)


# --- publish ---------------------------------------------------------------------------------------


def with_titles(recs: pl.DataFrame, titles: pl.DataFrame) -> pl.DataFrame:
    """``recs`` plus the optional ``title`` column, row order kept; ids cast to the recs' id type."""
    table = (titles.select(pl.col(ITEM_ID).cast(recs[ITEM_ID].dtype, strict=False),
                           pl.col(TITLE).cast(pl.String))
             .drop_nulls(ITEM_ID).unique(ITEM_ID, keep="first"))
    return recs.join(table, on=ITEM_ID, how="left", maintain_order="left")


def list_source() -> pl.Expr:
    """A whole list's source inside a per-user aggregation: ``popular``, else ``model`` (a model list
    keeps that name when the continuation slots placed its first items)."""
    return (pl.when(pl.col(SOURCE).first() == "popular").then(pl.lit("popular"))
            .otherwise(pl.lit("model")).alias(SOURCE))


def wide_frame(recs: pl.DataFrame) -> pl.DataFrame:
    """One row per user: items and scores as lists in rank order."""
    return (
        recs.sort(USER_ID, RANK)
        .group_by(USER_ID, maintain_order=True)
        .agg(
            pl.col(ITEM_ID).alias("item_ids"),
            pl.col(SCORE).alias("scores"),
            *([pl.col(TITLE).alias("titles")] if TITLE in recs.columns else []),
            list_source(),
            pl.col(MODEL_NAME).first(),
            pl.col(MODEL_VERSION).first(),
            pl.col(RUN_DATE).first(),
        )
    )


def _write_partition(
    exports_dir: Path,
    dataset: str,
    run_date: date,
    manifest: dict[str, Any],
    write: Any,
    exchange: bool,
) -> Path:
    """Write one partition into staging via ``write(folder) -> list[file names]``, then publish it."""
    staging = _staging_root(exports_dir)
    staging.mkdir(parents=True, exist_ok=True)
    prefix = _stage_prefix(dataset, run_date)
    stage = staging / f"{prefix}.tmp-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    target = partition_dir(exports_dir, run_date, dataset)
    try:
        t0 = time.perf_counter()
        files = write(stage)
        for name in files:
            _fsync_file(stage / name)
        _crash_point("staged")
        timings = {**manifest.get("timings", {}), "write_s": round(time.perf_counter() - t0, 4)}
        body = {**manifest, "dataset": dataset, "files": files, "timings": timings,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
        tmp = stage / (MANIFEST_FILE + ".tmp")
        tmp.write_text(json.dumps(body, indent=2, sort_keys=False, default=str))
        _fsync_file(tmp)
        os.replace(tmp, stage / MANIFEST_FILE)
        _fsync_dir(stage)
        _crash_point("manifest")
        _swap_into_place(stage, target, staging, prefix, exchange=exchange)
    except Exception:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return target


def publish_recs(recs: pl.DataFrame, *, exports_dir: Path, run_date: date, **kwargs: Any) -> PublishResult:
    """:func:`_publish_recs` holding the run date's :func:`publishing` lock (concurrent runs take turns)."""
    with publishing(exports_dir, run_date):
        return _publish_recs(recs, exports_dir=exports_dir, run_date=run_date, **kwargs)


def _publish_recs(
    recs: pl.DataFrame,
    *,
    exports_dir: Path,
    run_date: date,
    manifest: dict[str, Any],
    checks: RecsChecks,
    write_csv: bool = False,
    write_wide: bool = False,
    exchange: bool = True,
    titles: pl.DataFrame | None = None,
) -> PublishResult:
    """Validate ``recs`` (long format), then publish it atomically for ``run_date``.

    Raises ExportValidationError (and writes nothing) when a check fails. ``manifest`` is stored as
    ``_manifest.json`` with ``rows``, ``files`` and ``created_at`` added. ``exchange=False`` forces the
    portable two-rename replacement (used by tests). ``titles`` (``item_id, title``, e.g.
    ``recsys.data.catalogue.titles_frame``) adds the optional ``title`` column (null where unknown).
    """
    t0 = time.perf_counter()
    errors = validate_recs(recs, checks)
    if errors:
        raise ExportValidationError(
            f"export for run_date={run_date} not published, {len(errors)} failed checks:\n  - "
            + "\n  - ".join(errors)
        )
    timings = {"validate_s": time.perf_counter() - t0}
    t1 = time.perf_counter()
    recs = recs.select(LONG_COLUMNS)  # already (user_id, rank) ordered by the scorer
    if titles is not None:
        recs = with_titles(recs, titles)
    base = {**manifest, "rows": recs.height, "run_date": run_date.isoformat(),
            "timings": {**manifest.get("timings", {}), "validate_s": round(timings["validate_s"], 4)}}
    datasets = [RECS_DATASET]
    extra: dict[str, Path] = {}
    if write_wide:
        datasets.insert(0, WIDE_DATASET)
    if write_csv:
        datasets.insert(0, CSV_DATASET)
    for dataset in (CSV_DATASET, WIDE_DATASET, RECS_DATASET):
        recover(exports_dir, dataset, run_date)
    for dataset in (CSV_DATASET, WIDE_DATASET):
        if dataset not in datasets:  # not written this time: an older run's variant would contradict it
            _retire(exports_dir, dataset, run_date)

    def write_long(folder: Path) -> list[str]:
        recs.write_parquet(folder / DATA_FILE)
        return [DATA_FILE]

    def write_wide_file(folder: Path) -> list[str]:
        wide_frame(recs).write_parquet(folder / DATA_FILE)
        return [DATA_FILE]

    def write_csv_file(folder: Path) -> list[str]:
        csv_safe(recs).write_csv(folder / CSV_FILE)
        return [CSV_FILE]

    writers = {RECS_DATASET: write_long, WIDE_DATASET: write_wide_file, CSV_DATASET: write_csv_file}
    path = Path()
    for dataset in datasets:
        out = _write_partition(exports_dir, dataset, run_date, base, writers[dataset], exchange)
        if dataset == RECS_DATASET:
            path = out
        else:
            extra[dataset] = out
    timings["write_s"] = time.perf_counter() - t1
    log.info("published %d rows to %s in %.2fs", recs.height, path, sum(timings.values()))
    return PublishResult(path=path, extra_paths=extra, timings=timings)
