"""The ``recsys`` Typer app, its shared options and its error helpers; commands live beside it by stage.

Heavy libraries (torch, mlflow, prefect) are imported inside the commands that need them so that
``recsys --help`` and the data commands start fast.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from recsys.config import PROFILE_ENV, Config, ConfigError, load_config

app = typer.Typer(
    add_completion=False, no_args_is_help=True,
    help="Next-watch recommendations: one command per pipeline stage, each usable on its own paths.",
)
console = Console()

ConfOption = Annotated[
    Path | None, typer.Option("--conf", help="Config directory (default: $RECSYS_CONF_DIR or ./conf).")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key, e.g. --set sessions.gap_minutes=45 (repeatable)."),
]


@app.callback()
def main(
    profile: Annotated[str | None, typer.Option(
        "--profile", help="Tuned settings for a kind of data: conf/profiles/NAME.yaml (e.g. movielens).",
    )] = None,
) -> None:
    """Options shared by every command."""
    if profile:  # the environment carries it to flows and worker processes too
        os.environ[PROFILE_ENV] = profile


def load_cli_config(conf: Path | None, overrides: list[str] | None) -> Config:
    """Load config for a command; a bad key or value exits with the message naming it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return load_config(conf, overrides or [])
    except ConfigError as exc:
        console.print(f"[red]config error:[/red] {escape(str(exc))}", soft_wrap=True)  # never wrapped
        raise typer.Exit(2) from None


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a clear error and return the Exit to raise."""
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)  # never wrapped
    return typer.Exit(code)


def run(application: typer.Typer | None = None) -> None:
    """Run the CLI; a file-system failure (full disk, read-only root, permissions) is one line naming the
    path, not a traceback."""
    try:
        (application or app)()
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        console.print(f"[red]error:[/red] {escape((exc.strerror or str(exc)) + where)}", soft_wrap=True)
        raise SystemExit(1) from None
