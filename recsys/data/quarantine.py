"""Quarantine files: the rejected rows of one input, with source, row number, reason and raw text.

One file per input *occurrence*, named after the input, a short hash of its absolute path (two
``ratings.csv`` from different folders do not collide) and its occurrence in the run (the same file given
twice gets ``.0`` and ``.1``, so the report and the quarantine always hold the same rows). Files are
written to the work folder first and published (renamed) only after the events commit, so a failed run
changes nothing. Re-ingesting an input replaces its quarantine files; an input that is now clean removes
its old ones: the quarantine always describes the last run of each input.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from recsys.data.workspace import commit_file, write_parquet_durable
from recsys.schemas import QUARANTINE_SCHEMA


def _prefix(source: Path) -> str:
    digest = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:8]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", source.name) or "input"
    return f"{stem}.{digest}"


def quarantine_path(quarantine_dir: Path, source: Path, occurrence: int = 0) -> Path:
    return quarantine_dir / f"{_prefix(source)}.{occurrence}.parquet"


@dataclass
class StagedQuarantine:
    """A quarantine file written to the work folder, published by :meth:`publish`."""

    tmp: Path | None  # None: the input had no bad rows
    dest: Path
    source: Path
    occurrence: int
    occurrences: int = 1  # how often the same input appears in the run

    def publish(self, occurrences: int) -> None:
        """Move the file into place; remove this input's files of earlier runs that no longer apply."""
        if self.tmp is not None:
            commit_file(self.tmp, self.dest)
        else:
            self.dest.unlink(missing_ok=True)
        if self.occurrence == 0:
            for old in self.dest.parent.glob(f"{_prefix(self.source)}.*parquet"):
                tail = old.name[len(_prefix(self.source)) + 1:].removesuffix(".parquet")
                if not tail.isdigit() or int(tail) >= occurrences:  # older naming or a dropped repeat
                    old.unlink(missing_ok=True)


def stage_quarantine(rows: pl.DataFrame, quarantine_dir: Path, source: Path, occurrence: int,
                     work: Path) -> StagedQuarantine:
    """Write ``rows`` (source, row, reason, raw) for one input occurrence to the work folder."""
    dest = quarantine_path(quarantine_dir, source, occurrence)
    if rows.height == 0:
        return StagedQuarantine(None, dest, source, occurrence)
    frame = rows.select([pl.col(c).cast(t) for c, t in QUARANTINE_SCHEMA.items()]).sort("row")
    tmp = work / "quarantine" / dest.name
    write_parquet_durable(frame, tmp)
    return StagedQuarantine(tmp, dest, source, occurrence)
