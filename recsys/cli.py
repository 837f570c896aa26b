"""``recsys`` command line: one command per pipeline stage, each usable on its own paths.

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

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
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


# --- data stages -----------------------------------------------------------------------------------

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
    conf: ConfOption = None,
    set_: SetOption = None,
) -> None:
    """Validate, de-duplicate and write viewing logs as date-partitioned events; bad rows to quarantine."""
    from recsys.data.ingest import IngestError, ingest_files
    from recsys.data.ingest_view import ingest_tables

    config = load_cli_config(conf, [*(set_ or []), *([f"ingest.preset={preset}"] if preset else [])])
    try:
        with console.status("ingesting..."):
            report = ingest_files(list(inputs), config)
    except IngestError as exc:
        if exc.report is not None:
            console.print(ingest_tables(exc.report))
        raise fail(str(exc)) from None
    console.print(ingest_tables(report))
    report_file = Path(report.events_dir).parent / "ingest_report.json"
    console.print(f"events -> {report.events_dir} (report: {report_file})")


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


# --- model stages ----------------------------------------------------------------------------------

@app.command()
def train(
    split_dir: Annotated[Path | None, typer.Option("--split-dir", help="Default: <data_root>/split.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from <run dir>/last.pt.")] = False,
    checkpoint_dir: Annotated[
        Path | None, typer.Option("--checkpoint-dir", help="Default: <data_root>/checkpoints/<run_name>.")
    ] = None,
    track: Annotated[bool, typer.Option(
        "--track/--no-track", help="Record the run in MLflow and register the model as @challenger.")] = True,
    conf: ConfOption = None,
    set_: SetOption = None,
) -> None:
    """Train GRU4Rec (checkpoint every epoch, early stopping), then test it against both baselines."""
    from recsys.eval_table import metrics_table
    from recsys.evaluate import resolve_exclude_seen
    from recsys.train import NonFiniteLossError, train_model

    config = load_cli_config(conf, set_)
    try:
        if track:  # MLflow run + registered version; an unreachable store is a RuntimeError naming the fix
            result = _train_tracked(config, split_dir, checkpoint_dir, resume)
        else:
            result = train_model(config, split_dir, checkpoint_dir, resume=resume)
    except (FileNotFoundError, ValueError, NonFiniteLossError, RuntimeError) as exc:
        raise fail(str(exc)) from None
    rows = {"gru4rec": result.test_metrics, **result.baseline_metrics}
    table = metrics_table(rows, config.evaluate.cutoffs, "test", resolve_exclude_seen(config))
    (console if console.is_terminal else Console(width=max(console.width, 120))).print(table)
    last = result.history[-1] if result.history else {}
    refit = f", then refit on train + valid for {result.refit_epochs} epochs" if result.refit_epochs else ""
    console.print(
        f"best epoch {result.best_epoch} of {len(result.history)} on {result.device}"
        f"{' (early stop)' if result.stopped_early else ''}{refit}; "
        f"{last.get('events_per_second', 0):,.0f} events/s in the last epoch; "
        f"checkpoint {result.best_checkpoint}"
    )


@app.command()
def evaluate(
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="GRU4Rec checkpoint; omit for the baselines only.")
    ] = None,
    split: Annotated[str, typer.Option("--split", help="valid or test.")] = "test",
    split_dir: Annotated[Path | None, typer.Option("--split-dir", help="Default: <data_root>/split.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, auto (train.device).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write every metric here.")] = None,
    conf: ConfOption = None,
    set_: SetOption = None,
) -> None:
    """Rank the full catalogue for every target of a split: GRU4Rec vs item-kNN and most-popular."""
    import json

    from recsys.device import resolve_device
    from recsys.eval_table import metrics_table
    from recsys.evaluate import evaluate_all, resolve_exclude_seen

    config = load_cli_config(conf, set_)
    if split not in ("valid", "test"):
        raise fail(f"--split must be valid or test, got {split!r}", 2)
    try:
        dev = resolve_device(device or config.train.device)
    except RuntimeError as exc:
        raise fail(str(exc)) from None
    recommenders, vocab = {}, None
    if checkpoint is not None:
        from recsys.model.checkpoint import build_model, load_checkpoint
        from recsys.model.recommender import GRU4RecRecommender

        if not checkpoint.is_file():
            raise fail(f"checkpoint {checkpoint} does not exist")
        ckpt = load_checkpoint(checkpoint)
        vocab = ckpt.vocab
        recommenders["gru4rec"] = GRU4RecRecommender(build_model(ckpt, dev), dev)
    try:
        rows = evaluate_all(config, split_dir, recommenders, split=split, vocab=vocab, device=dev)
    except (FileNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from None
    exclude_seen = resolve_exclude_seen(config)
    table = metrics_table(rows, config.evaluate.cutoffs, split, exclude_seen)
    # Piped output (logs, CI) is not cut to 80 columns; a terminal shows what fits.
    (console if console.is_terminal else Console(width=max(console.width, 120))).print(table)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        report = {"split": split, "checkpoint": str(checkpoint) if checkpoint else None,
                  "exclude_seen": exclude_seen, "rows": rows}
        json_out.write_text(json.dumps(report, indent=2))
        console.print(f"metrics written to {json_out}")

# --- tracking and registry -------------------------------------------------------------------------


def _tracking_error(exc: Exception) -> typer.Exit:
    """Store unreachable, unknown model or version: one clear line, exit 1."""
    return fail(str(exc))


def _train_tracked(config: Config, split_dir: Path | None, checkpoint_dir: Path | None, resume: bool):
    """``recsys train`` with tracking: the MLflow run and registered version, and the TrainResult."""
    from recsys.tracking import tracked_training
    from recsys.train import TrainResult

    out = tracked_training(config, split_dir, resume=resume, checkpoint_dir=checkpoint_dir)
    console.print(f"MLflow run {out['run_id']} ({out['tracking_uri']}); registered {out['registered_model']} "
                  f"version {out['model_version']} as @challenger")
    return TrainResult(
        best_checkpoint=Path(out["checkpoint"]), history=out["history"], test_metrics=out["test_metrics"],
        baseline_metrics=out["baseline_metrics"], device=out["device"], n_items=out["n_items"],
        best_epoch=out["best_epoch"], stopped_early=out["stopped_early"],
    )


@app.command()
def register(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint file to log and register.")],
    conf: ConfOption = None,
    set_: SetOption = None,
) -> None:
    """Log an existing checkpoint as a run + registered model version (@challenger), e.g. after an outage."""
    config = load_cli_config(conf, set_)
    from recsys.registry import register_checkpoint
    from recsys.tracking import TrackingUnavailableError

    try:
        out = register_checkpoint(config, checkpoint)
    except (FileNotFoundError, ValueError, TrackingUnavailableError) as exc:
        raise _tracking_error(exc) from None
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
    from recsys.registry import RegistryError
    from recsys.registry import promote as run_promotion
    from recsys.tracking import TrackingUnavailableError

    try:
        decision = run_promotion(config)
    except (RegistryError, TrackingUnavailableError, FileNotFoundError, ValueError) as exc:
        raise _tracking_error(exc) from None
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
    from recsys.tracking import TrackingUnavailableError
    from recsys.tune import tune as run_tune

    try:
        summary = run_tune(config)
    except (ConfigError, TrackingUnavailableError, FileNotFoundError, RuntimeError) as exc:
        raise _tracking_error(exc) from None
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
    """MLflow UI on 127.0.0.1 against the pipeline's tracking store (runs until Ctrl-C)."""
    import os
    import signal
    import subprocess
    import sys

    config = load_cli_config(conf, set_)
    from recsys.tracking import connect, resolve_tracking_uri

    uri = resolve_tracking_uri(config)
    if not uri.startswith("sqlite:"):
        raise fail(f"the tracking store is a server ({uri}): open that; `recsys ui` is for the embedded one")
    connect(config)  # creates the database and experiment on first use
    # No background job runner (huey consumers, only used by GenAI jobs): the UI needs one process tree.
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": os.environ.get("MLFLOW_DISABLE_TELEMETRY", "true"),
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--registry-store-uri", uri,
               "--default-artifact-root", (config.paths.mlflow_dir / "artifacts").resolve().as_uri(),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    console.print(f"MLflow UI: [bold]http://127.0.0.1:{port}[/bold]  (store {uri}; Ctrl-C stops it)")
    server = subprocess.Popen(command, env=env, start_new_session=True)  # own group: stopped as a whole

    def stop(signum: int, frame: object) -> None:  # SIGTERM to this process also stops the server
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        code = server.wait()
    except KeyboardInterrupt:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        code = 0
    raise typer.Exit(code)


# --- scoring ---------------------------------------------------------------------------------------

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

    from recsys.score import score_users
    from recsys.score_report import print_score_summary

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
    print_score_summary(console if console.is_terminal else Console(width=max(console.width, 120)), manifest)

# --- orchestration ---------------------------------------------------------------------------------


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
) -> None:
    """Run the whole pipeline as a Prefect flow (ephemeral API, embedded MLflow) and show the result."""
    from datetime import date

    _prefect_env(conf, overrides)
    from flows.demo import DEMO_OVERRIDES, print_summary, run_pipeline

    all_overrides = ([] if full else list(DEMO_OVERRIDES)) + list(overrides or [])
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
    """Serve the scheduled deployments (daily ingest + score, weekly train + promote) until stopped."""
    _prefect_env(conf, overrides)
    from flows.serve import main

    args = [a for o in overrides or [] for a in ("--set", o)]
    main(args + ([f"--limit={limit}"] if limit else []))


if __name__ == "__main__":
    app()
