"""Rich tables for an ingest report (the CLI's output; the library itself only logs)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Group
from rich.table import Table

from recsys.data.ingest import IngestReport


def _partition_span(parts: list[str]) -> str:
    if not parts:
        return "0"
    days = [p.split("=", 1)[-1] for p in parts]
    return f"{len(days):,} ({days[0]} .. {days[-1]})" if len(days) > 1 else f"1 ({days[0]})"


def ingest_tables(report: IngestReport) -> Group:
    """Totals, one row per input file, and the quarantine reasons."""
    totals = Table(title=f"ingest ({report.status})", show_header=False)
    totals.add_column("measure")
    totals.add_column("value", justify="right")
    rate = report.rows_in / report.seconds if report.seconds else 0.0
    for name, value in (
        ("rows read", f"{report.rows_in:,}"),
        ("events written", f"{report.events_written:,}"),
        ("duplicates removed", f"{report.duplicates:,}"),
        ("rows quarantined", f"{report.n_quarantined:,} ({report.bad_fraction:.2%})"),
        (f"partitions written (by {report.partition_by})", _partition_span(report.partitions)),
        ("  of which replaced", f"{report.partitions_replaced:,} ({report.partition_mode} mode)"),
        ("events table version", "unchanged" if report.events_written == 0 and not report.replaced
         else str(report.table_version)),
        ("id types (user, item)", f"{report.user_id_type}, {report.item_id_type}"),
        ("time", f"{report.seconds:.1f} s ({rate:,.0f} rows/s)"),
    ):
        totals.add_row(name, value)
    files = Table(title="inputs")
    for col in ("source", "format", "ts", "rows", "events", "duplicates", "quarantined", "blank lines"):
        files.add_column(col, justify="left" if col in ("source", "format", "ts") else "right",
                         overflow="fold")
    for f in report.files:
        files.add_row(Path(f.source).name, f.preset or f.kind, f.ts_mode, f"{f.rows:,}",
                      f"{f.events_written:,}", f"{f.duplicates:,}", f"{sum(f.quarantined.values()):,}",
                      f"{f.blank_lines:,}")
    parts: list[Table] = [totals, files]
    if report.quarantined:
        reasons = Table(title=f"quarantine reasons -> {report.quarantine_dir}")
        reasons.add_column("reason")
        reasons.add_column("rows", justify="right")
        for reason, n in report.quarantined.items():
            reasons.add_row(reason, f"{n:,}")
        parts.append(reasons)
    return Group(*parts)
