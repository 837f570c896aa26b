"""Data and code lineage of a training run, as flat string tags.

A run must say exactly which split it was trained on (a hash of the split files' bytes, so two runs on
byte-identical data share a hash), which code (git sha) and which library versions, so that any number
in the tracking store can be traced back and reproduced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from recsys.schemas import STATS_FILE, TEST_FILE, TRAIN_FILE, VALID_FILE, VOCAB_FILE

logger = logging.getLogger(__name__)

SPLIT_FILES = (TRAIN_FILE, VALID_FILE, TEST_FILE, VOCAB_FILE, STATS_FILE)
PACKAGES = ("torch", "mlflow", "polars", "numpy", "pyarrow", "optuna", "recsys")
_CHUNK = 1 << 20


def snapshot_hash(split_dir: Path) -> str:
    """SHA-256 over the names and bytes of the split files present (sorted), hex digest."""
    digest = hashlib.sha256()
    for name in sorted(SPLIT_FILES):
        path = Path(split_dir) / name
        if not path.is_file():
            continue
        digest.update(name.encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def read_split_stats(split_dir: Path) -> dict[str, Any]:
    """The split's ``stats.json``, or ``{}`` when it is missing or unreadable."""
    path = Path(split_dir) / STATS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _row_count(path: Path) -> int | None:
    try:
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    except Exception:  # a missing or unreadable file simply has no count
        return None


def _flat_scalars(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_scalars(value, f"{name}."))
        elif isinstance(value, (str, int, float, bool)) or value is None:
            out[name] = value
    return out


def git_sha(repo_dir: Path | None = None) -> tuple[str | None, bool]:
    """(HEAD sha, working tree dirty) of the repository holding the code, (None, False) outside git."""
    cwd = repo_dir or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None, False
    return (sha or None), bool(status.strip())


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def lineage_tags(split_dir: Path, events_dir: Path | None = None, seed: int | None = None) -> dict[str, str]:
    """Tags naming the input data, its snapshot hash, row counts, cutoffs, code version and packages.

    Cutoffs and counts come from ``stats.json`` (every scalar whose key mentions a cutoff, plus the
    split's row counts read from Parquet metadata, which costs no data read).
    """
    split_dir = Path(split_dir)
    tags: dict[str, str] = {
        "data.split_dir": str(split_dir.resolve()),
        "data.snapshot_hash": snapshot_hash(split_dir),
    }
    stats = read_split_stats(split_dir)
    version = (stats.get("sessions_stage") or {}).get("events_version")
    if events_dir is not None:
        tags["data.events_dir"] = str(Path(events_dir).resolve())
        if version is None:  # a split from before versions were recorded: the table's current one
            from recsys.data.events_table import table_version

            version = table_version(Path(events_dir))
    if version is not None:  # reproduce with `pl.scan_delta(events_dir, version=N)`
        tags["data.events_version"] = str(version)
    for name in (TRAIN_FILE, VALID_FILE, TEST_FILE, VOCAB_FILE):
        rows = _row_count(split_dir / name)
        if rows is not None:
            tags[f"data.rows.{name.removesuffix('.parquet')}"] = str(rows)
    for key, value in _flat_scalars(stats).items():
        lowered = key.lower()
        if "cutoff" in lowered or lowered in {"protocol", "mode"} or lowered.endswith(".protocol"):
            tags[f"data.{key}"] = str(value)
    sha, dirty = git_sha()
    if sha:
        tags["code.git_sha"] = sha
        tags["code.git_dirty"] = str(dirty).lower()
        tags["mlflow.source.git.commit"] = sha  # the UI shows this one
    for name, version in package_versions().items():
        tags[f"versions.{name}"] = version
    if seed is not None:
        tags["seed"] = str(seed)
    return tags


UPDATED_FROM_TAG = "lineage.updated_from"  # registered-version and run tag of an incremental update


def update_lineage_tags(parent_version: str, events_up_to: str, n_new_items: int) -> dict[str, str]:
    """Tags of a daily update (recsys.training.update): which version it grew from and on which data.

    ``lineage.updated_from`` reads "updated from version N with events up to T", so the registry says at
    a glance that a version is an update and not a full training.
    """
    return {
        UPDATED_FROM_TAG: f"updated from version {parent_version} with events up to {events_up_to}",
        "lineage.parent_version": str(parent_version),
        "lineage.events_up_to": events_up_to,
        "lineage.new_items": str(n_new_items),
    }
