"""Quarantine files: the rejected rows of one input, with source, row number, reason and raw text.

One file per input, named after the input (plus a short hash of its absolute path, so two ``ratings.csv``
from different folders do not collide). Re-ingesting the same input replaces its quarantine file; an
input that is now clean removes its old one, so the quarantine always describes the last run of each
input.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import polars as pl

from recsys.data.partitions import commit_file, write_parquet_durable
from recsys.schemas import QUARANTINE_SCHEMA


def quarantine_path(quarantine_dir: Path, source: Path) -> Path:
    digest = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:8]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", source.name) or "input"
    return quarantine_dir / f"{stem}.{digest}.parquet"


def write_quarantine(rows: pl.DataFrame, quarantine_dir: Path, source: Path, work: Path) -> Path | None:
    """Atomically write ``rows`` (source, row, reason, raw) for ``source``; None when there are none."""
    dest = quarantine_path(quarantine_dir, source)
    if rows.height == 0:
        dest.unlink(missing_ok=True)
        return None
    frame = rows.select([pl.col(c).cast(t) for c, t in QUARANTINE_SCHEMA.items()]).sort("row")
    tmp = work / "quarantine" / dest.name
    write_parquet_durable(frame, tmp)
    commit_file(tmp, dest)
    return dest
