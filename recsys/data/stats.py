"""The data stats table: what ingest, sessions and split did, as rich tables (the JSON is split/stats.json).

``split_sessions`` gathers one dict (its own counts, the sessions stage's ``_stats.json`` and the ingest
report); this module only reads reports and renders that dict, so the CLI and flows print the same table.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

log = logging.getLogger(__name__)

INGEST_REPORT_FILE = "ingest_report.json"


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when missing or unreadable (reports are optional)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return None


def find_ingest_report(events_dir: Path) -> dict[str, Any] | None:
    """The ingest stage's ``ingest_report.json``, inside or beside the events directory, if present."""
    for path in (Path(events_dir) / INGEST_REPORT_FILE, Path(events_dir).parent / INGEST_REPORT_FILE):
        if (report := read_json(path)) is not None:
            return report
    return None


def _n(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.2f}"
    return f"{int(value):,}"


def data_table(stats: dict[str, Any]) -> Table:
    """Events -> sequences: counts at each stage and the sequence length distribution."""
    table = Table(title="Data", show_header=True, header_style="bold")
    table.add_column("stage")
    table.add_column("measure")
    table.add_column("value", justify="right")
    ingest = stats.get("ingest") or {}
    if ingest:
        quarantined = ingest.get("quarantined") or {}
        table.add_row("ingest", "rows read", _n(ingest.get("rows_in")))
        table.add_row("", "events written", _n(ingest.get("events_written")))
        table.add_row("", "duplicates", _n(ingest.get("duplicates")))
        table.add_row("", "quarantined", _n(sum(quarantined.values()) if quarantined else 0))
    sess = stats.get("sessions_stage") or {}
    if sess:
        table.add_row("sessions", "mode", str(sess.get("mode")))
        counts_in = (_n(sess.get(k)) for k in ("events_in", "users_in", "items_in"))
        table.add_row("", "events / users / items in", " / ".join(counts_in))
        table.add_row("", "events of rare items dropped", _n(sess.get("events_rare_items")))
        table.add_row("", "consecutive repeats dropped", _n(sess.get("events_repeats")))
        table.add_row("", "events cut by max_length", _n(sess.get("events_truncated")))
        table.add_row("", "short sequences dropped", _n(sess.get("sequences_too_short")))
    # After `recsys sessions` alone, the sequences row comes from the sessions stage's own counts.
    seq = stats.get("sequences") or {
        "sequences": sess.get("sessions"), "events": sess.get("events"), "users": sess.get("users"),
        "items": sess.get("items"), "length": sess.get("length"),
    } if sess else {}
    if seq:
        length = seq.get("length") or {}
        table.add_row("sequences", "sequences", _n(seq.get("sequences")))
        table.add_row("", "events / users / items",
                      f"{_n(seq.get('events'))} / {_n(seq.get('users'))} / {_n(seq.get('items'))}")
        table.add_row("", "length p50 / p90 / p99 / max",
                      " / ".join(_n(length.get(k)) for k in ("p50", "p90", "p99", "max")))
    return table


def quarantine_table(stats: dict[str, Any]) -> Table | None:
    """Quarantined rows per reason, or None when ingest reported none."""
    quarantined = (stats.get("ingest") or {}).get("quarantined") or {}
    if not quarantined:
        return None
    table = Table(title="Quarantine", header_style="bold")
    table.add_column("reason")
    table.add_column("rows", justify="right")
    for reason, count in sorted(quarantined.items(), key=lambda kv: -kv[1]):
        table.add_row(reason, _n(count))
    return table


def split_table(stats: dict[str, Any]) -> Table:
    """Per split: sequences, events, targets and targets on items unseen in train."""
    title = f"Split ({stats.get('protocol')})"
    if stats.get("test_cutoff"):
        title += f"  valid >= {stats['valid_cutoff']}  test >= {stats['test_cutoff']}"
    table = Table(title=title, header_style="bold")
    for name in ("split", "sequences", "users", "events", "targets", "unseen targets", "unseen %"):
        table.add_column(name, justify="left" if name == "split" else "right")
    for name, row in (stats.get("splits") or {}).items():
        table.add_row(
            name, _n(row["sequences"]), _n(row["users"]), _n(row["events"]), _n(row["targets"]),
            _n(row["unseen_targets"]) if name != "train" else "-",
            f"{100 * row['unseen_target_fraction']:.2f}" if name != "train" else "-",
        )
    table.caption = f"vocabulary (train items): {_n(stats.get('vocab_size'))}"
    return table


def print_stats(stats: dict[str, Any], console: Console | None = None) -> None:
    """Print the data, quarantine and split tables of a split stats dict."""
    console = console or Console()
    console.print(data_table(stats))
    if (quarantine := quarantine_table(stats)) is not None:
        console.print(quarantine)
    if stats.get("splits"):
        console.print(split_table(stats))
