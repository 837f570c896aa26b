"""``recsys`` command line: one command per pipeline stage, each usable on its own paths.

Heavy libraries (torch, mlflow, prefect) are imported inside the commands that need them so that
``recsys --help`` and the data commands start fast.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from recsys.config import Config, ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
console = Console()

ConfOption = Annotated[
    Path | None, typer.Option("--conf", help="Config directory (default: $RECSYS_CONF_DIR or ./conf).")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key, e.g. --set sessions.gap_minutes=45 (repeatable)."),
]


def load_cli_config(conf: Path | None, overrides: list[str] | None) -> Config:
    """Load config for a command; a bad key or value exits with the message naming it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return load_config(conf, overrides or [])
    except ConfigError as exc:
        console.print(f"[red]config error:[/red] {exc}")
        raise typer.Exit(2) from None


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a clear error and return the Exit to raise."""
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


# --- data stages -----------------------------------------------------------------------------------

# --- model stages ----------------------------------------------------------------------------------

# --- tracking and registry -------------------------------------------------------------------------

# --- scoring ---------------------------------------------------------------------------------------

# --- orchestration ---------------------------------------------------------------------------------


if __name__ == "__main__":
    app()
