"""Freshness commands: ingest the item catalogue, and the daily incremental update of the champion."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Annotated

import typer

from recsys.cli.common import ConfOption, SetOption, app, console, fail, load_cli_config


@app.command()
def catalogue(
    input: Annotated[Path, typer.Option(  # noqa: A002 - the option name users see
        "--input", help="Item table: Parquet/CSV (item_id, title, kind, ...), MovieLens u.item, movies.csv.",
    )],
    conf: ConfOption = None,
    set_: SetOption = None,
) -> None:
    """Validate the item catalogue (bad rows quarantined) and publish it to <data_root>/catalogue/."""
    from recsys.data.catalogue import ingest_catalogue
    from recsys.data.errors import IngestError

    config = load_cli_config(conf, set_)
    try:
        report = ingest_catalogue(input, config)
    except IngestError as exc:
        raise fail(str(exc)) from None
    bad = sum(report.quarantined.values())
    console.print(f"catalogue: {report.items_written} items from {report.rows_in} rows -> {report.path}"
                  + (f"; {bad} quarantined {report.quarantined} in {report.quarantine_file}" if bad else ""))


@app.command()
def update(
    as_of: Annotated[str | None, typer.Option(
        "--as-of", help="Add catalogue titles released up to this date, YYYY-MM-DD (default: the cutoff's).",
    )] = None,
    conf: ConfOption = None,
    set_: SetOption = None,
) -> None:
    """Grow the champion's vocabulary with new items and warm-start it on the newest data (-> @challenger).

    Run `recsys sessions` and `recsys split` first (the update trains on events before the split's test
    cutoff) and `recsys promote` after it: the same gate as a full training decides.
    """
    config = load_cli_config(conf, set_)
    from recsys.tracking.registry import RegistryError
    from recsys.tracking.store import TrackingUnavailableError
    from recsys.tracking.update_run import tracked_update

    try:
        day = date.fromisoformat(as_of) if as_of else None
        out = tracked_update(config, as_of=day)
    except (FileNotFoundError, ValueError, RegistryError, TrackingUnavailableError, RuntimeError) as exc:
        raise fail(str(exc)) from None
    sources = out.get("init_sources") or {}
    console.print(f"{out['lineage']}: {out['n_new_items']} new items "
                  f"(rows from series {sources.get('series', 0)}, genre {sources.get('genre', 0)}, "
                  f"popularity {sources.get('popularity', 0)}); registered {out['registered_model']} "
                  f"version {out['model_version']} as @challenger (run {out['run_id']})"
                  + (f" in {out['seconds']:.1f} s" if "seconds" in out else " (already done)"))
