"""The full ``recsys`` console script: the library's commands plus the ones that start Prefect.

``recsys/`` never imports Prefect or ``flows``; this module adds ``pipeline`` and ``serve`` to the
library's Typer app, and the ``recsys`` entry point in pyproject.toml runs it. Prefect itself is imported
inside the commands, after its home has been pointed at the data root.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from recsys.cli import app
from recsys.cli.common import ConfOption, SetOption, console, fail, load_cli_config, run
from recsys.config import Config


def _prefect_env(conf: Path | None, overrides: list[str] | None) -> Config:
    """Config for a Prefect command; Prefect state goes under the data root (set before importing it)."""
    import os

    config = load_cli_config(conf, overrides)
    if conf is not None:  # the flows load their config themselves: point them at the same directory
        os.environ["RECSYS_CONF_DIR"] = str(conf.resolve())
    from flows import use_local_prefect

    use_local_prefect(config.paths.prefect_home)
    return config


@app.command()
def pipeline(
    conf: ConfOption = None,
    overrides: SetOption = None,
    run_date: Annotated[str | None, typer.Option(help="Logical date YYYY-MM-DD (default: today).")] = None,
    input: Annotated[
        list[Path] | None, typer.Option("--input", help="Raw log files/dirs (default: synthetic data).")
    ] = None,
    shards: Annotated[int, typer.Option(min=1, help="Score users in this many shards (task runner).")] = 1,
    executor: Annotated[str, typer.Option(help="Where shards run: threads | dask (local).")] = "threads",
    full: Annotated[bool, typer.Option(help="Use conf/ as is, without the demo's quick settings.")] = False,
    users: Annotated[int, typer.Option(min=0, help="Users whose next-watch lists are printed.")] = 3,
    days: Annotated[int, typer.Option(min=1, help=(
        "Simulated days on synthetic data: day 1 the whole pipeline, then daily ingest -> update -> "
        "promote -> score cycles on the following days."))] = 1,
) -> None:
    """Run the whole pipeline as a Prefect flow (ephemeral API, embedded MLflow) and show the result."""
    from datetime import date

    _prefect_env(conf, overrides)
    from flows.demo import DEMO_OVERRIDES, print_summary, run_pipeline

    all_overrides = ([] if full else list(DEMO_OVERRIDES)) + list(overrides or [])
    if days > 1:
        if input or run_date:
            raise fail("--days replays the synthetic data's own days: it takes no --input or --run-date", 2)
        from flows.demo import FRESH_OVERRIDES, print_days, run_days

        all_overrides = [*([] if full else DEMO_OVERRIDES), *FRESH_OVERRIDES, *(overrides or [])]
        try:
            summary = run_days(all_overrides, days, shards=shards, executor=executor)
        except Exception as exc:  # the flow logs above name the failed stage and its traceback
            raise fail(f"pipeline failed: {type(exc).__name__}: {exc}") from None
        print_summary(console, summary, all_overrides, n_users=users)
        print_days(console, summary["days"])
        return
    day = date.fromisoformat(run_date) if run_date else None
    try:
        summary = run_pipeline(all_overrides, run_date=day, inputs=input, shards=shards, executor=executor)
    except Exception as exc:  # the flow logs above name the failed stage and its traceback
        raise fail(f"pipeline failed: {type(exc).__name__}: {exc}") from None
    print_summary(console, summary, all_overrides, n_users=users)


@app.command()
def serve(
    conf: ConfOption = None,
    overrides: SetOption = None,
    limit: Annotated[int | None, typer.Option(help="Max concurrent runs in this process.")] = None,
) -> None:
    """Serve the scheduled deployments (daily ingest + score, weekly train + promote) until stopped.

    Schedules need a real Prefect server (its scheduler creates the runs): with no PREFECT_API_URL a local
    one is started on 127.0.0.1:orchestrate.server_port (state under the data root) and stopped on exit.
    """
    import signal

    config = _prefect_env(conf, overrides)
    from flows.local_server import ServerStartError, prefect_api

    def interrupt(signum: int, frame: object) -> None:  # SIGTERM stops serving and the started server
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)

    args = [a for o in overrides or [] for a in ("--set", o)]
    port = config.orchestrate.server_port
    try:
        with prefect_api(config.paths.prefect_home.resolve(), port) as (api_url, started):
            ui = api_url.removesuffix("/api")
            console.print(f"Prefect {'server started' if started else 'API'}: [bold]{ui}[/bold] (UI); "
                          f"from another shell: PREFECT_API_URL={api_url} prefect deployment run "
                          "ingest/ingest-daily")
            from flows.serve import main

            main(args + ([f"--limit={limit}"] if limit else []))
    except ServerStartError as exc:
        raise fail(str(exc)) from None


def main() -> None:
    """The ``recsys`` console script."""
    run(app)


if __name__ == "__main__":
    main()
