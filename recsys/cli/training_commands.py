"""Model-stage commands: train (tracked in MLflow) and evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from recsys.cli.common import ConfOption, SetOption, app, console, fail, load_cli_config
from recsys.config import Config


def train_tracked(config: Config, split_dir: Path | None, checkpoint_dir: Path | None, resume: bool):
    """``recsys train`` with tracking: the MLflow run and registered version, and the TrainResult."""
    from recsys.tracking.runs import tracked_training
    from recsys.training.train import TrainResult

    out = tracked_training(config, split_dir, resume=resume, checkpoint_dir=checkpoint_dir)
    console.print(f"MLflow run {out['run_id']} ({out['tracking_uri']}); registered {out['registered_model']} "
                  f"version {out['model_version']} as @challenger")
    return TrainResult(
        best_checkpoint=Path(out["checkpoint"]), history=out["history"], test_metrics=out["test_metrics"],
        baseline_metrics=out["baseline_metrics"], device=out["device"], n_items=out["n_items"],
        best_epoch=out["best_epoch"], stopped_early=out["stopped_early"],
    )


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
    from recsys.training.evaluate import resolve_exclude_seen
    from recsys.training.metric_table import metrics_table
    from recsys.training.train import NonFiniteLossError, train_model

    config = load_cli_config(conf, set_)
    try:
        if track:  # MLflow run + registered version; an unreachable store is a RuntimeError naming the fix
            result = train_tracked(config, split_dir, checkpoint_dir, resume)
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
    from recsys.training.evaluate import evaluate_all, resolve_exclude_seen
    from recsys.training.metric_table import metrics_table

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

