"""Data-stage commands: generate, ingest, sessions, split, prepare."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from recsys.cli.common import ConfOption, SetOption, app, console, fail, load_cli_config


@app.command()
def generate(
    out: Annotated[
        Path | None, typer.Option("--out", help="Output directory (default: <data_root>/raw/synthetic).")
    ] = None,
    conf: ConfOption = None,
    set_: SetOption = None,
) -> None:
    """Write synthetic streaming-service viewing logs: the demo data and the benchmark data."""
    from rich.table import Table

    from recsys.data.synthetic import generate as generate_logs

    config = load_cli_config(conf, set_)
    with console.status("generating viewing logs..."):
        result = generate_logs(config, out)
    table = Table(title=f"synthetic viewing logs -> {result['out_dir']}", show_header=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    rows = [
        ("events", f"{result['events']:,}"),
        ("users", f"{result['users']:,}"),
        ("titles", f"{result['items']:,} ({result['series']:,} series, {result['episodes']:,} episodes, "
                   f"{result['films']:,} films)"),
        ("malformed rows", f"{result['noise_rows']:,} "
                           + ", ".join(f"{k} {v}" for k, v in result["noise"].items() if v)),
        ("files", f"{len(result['files'])} x {result['format']} + catalogue.parquet"),
        ("time", f"{result['seconds']:.1f} s ({result['events_per_second']:,} events/s)"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)

@app.command()
def ingest(
    inputs: Annotated[
        list[Path],
        typer.Argument(help="Viewing-log files (CSV/TSV/Parquet/NDJSON, .gz/.zst) or Parquet dirs."),
    ],
    preset: Annotated[
        str | None,
        typer.Option("--preset", help="movielens-100k|movielens-dat|movielens-csv|yoochoose|diginetica"),
    ] = None,
    replace: Annotated[
        bool,
        typer.Option("--replace", help="Make these rows the whole content of every partition they touch "
                                       "(default: merge, which only adds events not stored yet)."),
    ] = False,
    conf: ConfOption = None,
    set_: SetOption = None,
) -> None:
    """Validate, de-duplicate and commit viewing logs to the events table (one version per run); bad rows
    to quarantine."""
    from recsys.data.ingest import IngestError, ingest_files
    from recsys.data.ingest_view import ingest_tables

    extra = [f"ingest.preset={preset}"] if preset else []
    if replace:
        extra.append("ingest.partition_mode=replace")
    config = load_cli_config(conf, [*(set_ or []), *extra])
    try:
        with console.status("ingesting..."):
            report = ingest_files(list(inputs), config)
    except IngestError as exc:
        if exc.report is not None:
            console.print(ingest_tables(exc.report))
        raise fail(str(exc)) from None
    console.print(ingest_tables(report))
    for part, n in report.replaced.items():
        console.print(f"replaced {report.partitions[0].split('=')[0]}={part} ({n:,} events)")
    report_file = Path(report.events_dir).parent / "ingest_report.json"
    console.print(f"events -> {report.events_dir} version {report.table_version} (report: {report_file})")


def _print_data_stats(stats: dict, where: Path) -> None:
    from recsys.data.stats import print_stats

    print_stats(stats, console)
    console.print(f"stats saved to {where}")


@app.command()
def sessions(
    events: Annotated[
        Path | None, typer.Option("--events", help="Events directory (default: <data_root>/events).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Sessions directory (default: <data_root>/sessions).")
    ] = None,
    conf: ConfOption = None,
    set_: SetOption = None,
) -> None:
    """Cut events into sequences (inactivity gap or whole-user history) and filter them."""
    from recsys.data.sessions import SESSIONS_STATS_FILE, build_sessions
    from recsys.data.stats import data_table

    config = load_cli_config(conf, set_)
    out = out or config.paths.sessions_dir
    try:
        with console.status("building sessions..."):
            stats = build_sessions(config, events, out)
    except (FileNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from None
    console.print(data_table({"sessions_stage": stats, "ingest": stats.get("ingest")}))
    console.print(f"{stats['sessions']:,} sequences -> {out} ({stats['seconds']:.1f} s, "
                  f"{stats['events_per_second']:,} events/s); stats in {out / SESSIONS_STATS_FILE}")


@app.command()
def split(
    sessions_dir: Annotated[
        Path | None, typer.Option("--sessions", help="Sessions directory (default: <data_root>/sessions).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Split directory (default: <data_root>/split).")
    ] = None,
    conf: ConfOption = None,
    set_: SetOption = None,
) -> None:
    """Split sequences into train / valid / test (temporal or leave-one-out) and build the vocabulary."""
    from recsys.data.split import split_sessions
    from recsys.schemas import STATS_FILE

    config = load_cli_config(conf, set_)
    out = out or config.paths.split_dir
    try:
        with console.status("splitting..."):
            stats = split_sessions(config, sessions_dir, out)
    except (FileNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from None
    _print_data_stats(stats, out / STATS_FILE)


@app.command()
def prepare(
    inputs: Annotated[list[Path], typer.Argument(help="Viewing-log files or directories to ingest.")],
    conf: ConfOption = None,
    set_: SetOption = None,
) -> None:
    """Ingest -> sessions -> split in one go, into <data_root> (set it with --set paths.data_root=...)."""
    from recsys.data.errors import IngestError
    from recsys.data.ingest import ingest_files
    from recsys.data.sessions import build_sessions
    from recsys.data.split import split_sessions
    from recsys.schemas import STATS_FILE

    config = load_cli_config(conf, set_)
    try:
        with console.status("ingesting..."):
            report = ingest_files(list(inputs), config)
        with console.status("building sessions..."):
            build_sessions(config)
        with console.status("splitting..."):
            stats = split_sessions(config)
    except (FileNotFoundError, ValueError, IngestError) as exc:
        raise fail(str(exc)) from None
    if not stats.get("ingest"):
        stats["ingest"] = report.to_dict()
    _print_data_stats(stats, config.paths.split_dir / STATS_FILE)


