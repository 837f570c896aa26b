"""Tracking commands: register a kept checkpoint, promote, tune, open the MLflow UI."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from recsys.cli.common import ConfOption, SetOption, app, console, fail, load_cli_config
from recsys.config import ConfigError


@app.command()
def register(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint file to log and register.")],
    conf: ConfOption = None,
    set_: SetOption = None,
) -> None:
    """Log an existing checkpoint as a run + registered model version (@challenger), e.g. after an outage."""
    config = load_cli_config(conf, set_)
    from recsys.tracking.runs import register_checkpoint
    from recsys.tracking.store import TrackingUnavailableError

    try:
        out = register_checkpoint(config, checkpoint)
    except (FileNotFoundError, ValueError, TrackingUnavailableError) as exc:
        raise fail(str(exc)) from None
    console.print(f"registered [bold]{out['registered_model']}[/bold] version {out['model_version']} "
                  f"as @challenger (run {out['run_id']}, {out['tracking_uri']})")


@app.command()
def promote(
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the decision here.")] = None,
    conf: ConfOption = None,
    set_: SetOption = None,
) -> None:
    """Challenger vs champion vs most-popular on the test split; move @champion if the gate passes."""
    import json

    from rich.markup import escape
    from rich.table import Table

    config = load_cli_config(conf, set_)
    from recsys.tracking.promotion import promote as run_promotion
    from recsys.tracking.registry import RegistryError
    from recsys.tracking.store import TrackingUnavailableError

    try:
        decision = run_promotion(config)
    except (RegistryError, TrackingUnavailableError, FileNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from None
    metric = decision.metric
    cutoff = metric.partition("@")[2]
    columns = [f"{m}@{cutoff}" for m in ("recall", "mrr", "ndcg", "coverage")]
    table = Table(title=f"promotion on the test split ({config.tracking.registered_model})")
    table.add_column("model")
    for column in columns:
        table.add_column(column, justify="right")
    rows = [(f"challenger v{decision.challenger_version}", decision.challenger_metrics),
            (f"champion v{decision.champion_version}", decision.champion_metrics),
            ("most-popular", decision.popular_metrics)]
    for label, values in rows:
        if values:
            table.add_row(label, *(f"{values.get(c, float('nan')):.4f}" for c in columns))
    if table.row_count:  # nothing was evaluated when the challenger already is the champion
        console.print(table)
    verdict = "[green]PROMOTED[/green]" if decision.promoted else "[yellow]not promoted[/yellow]"
    console.print(f"{verdict}: {escape(decision.reason)}")  # the reason holds "[all]", not markup
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(decision.to_dict(), indent=2, default=str))


@app.command()
def tune(
    n_trials: Annotated[int | None, typer.Option(help="Total trials (tune.n_trials).")] = None,
    timeout_minutes: Annotated[
        float | None, typer.Option(help="Wall-time bound (tune.timeout_minutes).")
    ] = None,
    conf: ConfOption = None,
    set_: SetOption = None,
) -> None:
    """Optuna search over conf/tune.yaml's space: one MLflow parent run, a nested run per trial; resumable."""
    extra = [f"tune.n_trials={n_trials}"] if n_trials is not None else []
    extra += [f"tune.timeout_minutes={timeout_minutes}"] if timeout_minutes is not None else []
    config = load_cli_config(conf, [*(set_ or []), *extra])
    from recsys.tracking.store import TrackingUnavailableError
    from recsys.training.tune import tune as run_tune

    try:
        summary = run_tune(config)
    except (ConfigError, TrackingUnavailableError, FileNotFoundError, RuntimeError) as exc:
        raise fail(str(exc)) from None
    study, parent = summary["study"], summary["parent_run_id"]
    if "best_trial" not in summary:
        raise fail(f"no trial completed in study {study!r} (parent run {parent})")
    console.print(f"study {study!r}: {summary['n_complete']} complete of {summary['n_trials']} trials; best "
                  f"trial {summary['best_trial']} valid {config.tune.metric}={summary['best_value']:.4f} "
                  f"(run {summary['best_run_id']}, parent {parent})")
    console.print("train it with: recsys train " + " ".join(
        f"--set {k}={v}" for k, v in summary["best_params"].items()))


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
    conf: ConfOption = None,
    set_: SetOption = None,
) -> None:
    """MLflow UI on 127.0.0.1 against the pipeline's tracking store (runs until Ctrl-C).

    It is a writable tracking server (anything that reaches it can register models), so it binds to
    loopback only; a port already in use, or a server that fails to start, is an error (exit 1).
    """
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    config = load_cli_config(conf, set_)
    with socket.socket() as probe:  # fail now, not after printing a URL that some other process answers
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise fail(f"port {port} on 127.0.0.1 is in use: choose another with --port") from None
    from recsys.tracking.store import connect, resolve_tracking_uri

    uri = resolve_tracking_uri(config)
    if not uri.startswith("sqlite:"):
        from recsys.config import redact

        raise fail(f"the tracking store is a server ({redact(uri)}): open that; `recsys ui` is for the "
                   "embedded one")
    connect(config)  # creates the database and experiment on first use
    # No background job runner (huey consumers, only used by GenAI jobs): the UI needs one process tree.
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": os.environ.get("MLFLOW_DISABLE_TELEMETRY", "true"),
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--registry-store-uri", uri,
               "--default-artifact-root", (config.paths.mlflow_dir / "artifacts").resolve().as_uri(),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    server = subprocess.Popen(command, env=env, start_new_session=True)  # own group: stopped as a whole

    def stop_server() -> None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)

    def stop(signum: int, frame: object) -> None:  # SIGTERM to this process also stops the server
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                raise fail(f"the MLflow UI on {url} did not start (exit code {server.returncode}); "
                           "see the lines above")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    stop_server()
                    raise fail(f"the MLflow UI on {url} did not answer within 180 s") from None
                time.sleep(0.5)
        console.print(f"MLflow UI: [bold]{url}[/bold]  (store {uri}; Ctrl-C stops it)")
        code = server.wait()
    except KeyboardInterrupt:
        stop_server()
        code = 0
    raise typer.Exit(code)
