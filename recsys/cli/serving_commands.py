"""Serving command: score every user with the champion and export the lists."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from recsys.cli.common import ConfOption, SetOption, app, console, fail, load_cli_config


@app.command()
def score(
    model: Annotated[str | None, typer.Option(
        "--model", help="models:/NAME@alias, models:/NAME/VERSION, runs:/ID/model or a checkpoint path "
                        "(default: models:/<tracking.registered_model>@champion).")] = None,
    run_date: Annotated[str | None, typer.Option(
        "--run-date", help="YYYY-MM-DD: history up to the end of this day, and the export partition "
                           "(default: today, UTC).")] = None,
    users: Annotated[Path | None, typer.Option(
        "--users", help="Score only these users: one id per line, or a .parquet/.csv with user_id.")] = None,
    csv: Annotated[bool, typer.Option("--csv", help="Also write the export as CSV.")] = False,
    wide: Annotated[bool, typer.Option(
        "--wide", help="Also write one row per user (item and score lists).")] = False,
    conf: ConfOption = None,
    set_: SetOption = None,
) -> None:
    """Every user's top-K next-watch list from the champion model, validated and exported atomically."""
    from datetime import date

    from recsys.serving.report import print_score_summary
    from recsys.serving.score import catalogue_titles, score_users

    config = load_cli_config(conf, [*(set_ or []), *(["score.write_csv=true"] if csv else []),
                                    *(["score.write_wide=true"] if wide else [])])
    try:
        day = date.fromisoformat(run_date) if run_date else None
    except ValueError:
        raise fail(f"--run-date must be YYYY-MM-DD, got {run_date!r}", 2) from None
    if users is not None and not users.is_file():
        raise fail(f"users file {users} does not exist", 2)
    try:
        manifest = score_users(config, model_uri=model, run_date=day, users_file=users)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:  # incl. registry and validation errors
        raise fail(str(exc)) from None
    print_score_summary(console if console.is_terminal else Console(width=max(console.width, 120)), manifest,
                        titles=catalogue_titles(config))

