"""Shared helpers for the ingest tests: config on a temp data root, reading events back, file hashes."""

from __future__ import annotations

import gzip
import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import zstandard

from recsys.config import Config, load_config
from recsys.data.events_table import scan_events
from recsys.data.ingest import IngestReport, ingest_files
from recsys.data.staging import IN_MEMORY_ROWS

REPO = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 3, 1, tzinfo=UTC)  # fixed "now" for the max_future_days bound
STAGING = {"in_memory_rows": IN_MEMORY_ROWS}  # set for each test by the ``staging`` fixture


def make_config(root: Path, **ingest: Any) -> Config:
    """Defaults (as in conf/) plus ``ingest`` settings; an empty conf dir keeps other stages' edits out."""
    conf = root.parent / "empty-conf"
    conf.mkdir(parents=True, exist_ok=True)
    return load_config(conf, values={"paths": {"data_root": str(root)}, "ingest": ingest})


def run(inputs: list[Path], root: Path, **ingest: Any) -> IngestReport:
    return ingest_files(inputs, make_config(root, **ingest), now=NOW, **STAGING)


def events(root: Path, version: int | None = None) -> pl.DataFrame:
    """The stored events (of ``version``), read through the table's log, sorted by (user, ts, item)."""
    if not (root / "events" / "_delta_log").is_dir():
        return pl.DataFrame()
    frame = scan_events(root / "events", version).collect()
    return frame.sort("user_id", "ts", "item_id", maintain_order=True)


def quarantine(root: Path) -> pl.DataFrame:
    files = sorted((root / "quarantine").glob("*.parquet"))
    return pl.concat([pl.read_parquet(f) for f in files]).sort("source", "row") if files else pl.DataFrame()


def tree_hashes(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def assert_conserved(report: IngestReport) -> None:
    assert report.rows_in == report.events_written + report.duplicates + sum(report.quarantined.values())
