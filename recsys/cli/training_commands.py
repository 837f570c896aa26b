"""Model-stage commands: train (tracked in MLflow) and evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

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
    table = metrics_table(rows, config.evaluate.cutoffs, "test", result.policy)
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
    from recsys.model.policy import PolicyMismatchError, policy_for_model
    from recsys.training.evaluate import evaluate_all
    from recsys.training.metric_table import metrics_table

    config = load_cli_config(conf, set_)
    if split not in ("valid", "test"):
        raise fail(f"--split must be valid or test, got {split!r}", 2)
    try:
        dev = resolve_device(device or config.train.device)
    except RuntimeError as exc:
        raise fail(str(exc)) from None
    recommenders, vocab, policy, override = {}, None, None, None
    if checkpoint is not None:
        from recsys.model.checkpoint import build_model, load_checkpoint
        from recsys.model.recommender import GRU4RecRecommender

        if not checkpoint.is_file():
            raise fail(f"checkpoint {checkpoint} does not exist")
        ckpt = load_checkpoint(checkpoint)
        vocab = ckpt.vocab
        try:  # the model is ranked under the policy it was trained with; another one only on override
            policy, override = policy_for_model(ckpt.policy, config, vocab, f"evaluating {checkpoint}")
        except PolicyMismatchError as exc:
            raise fail(str(exc)) from None
        recommenders["gru4rec"] = GRU4RecRecommender(build_model(ckpt, dev), dev)
    try:
        if policy is None:  # baselines only: the config's policy over the split's vocabulary
            from recsys.data.vocab import Vocab
            from recsys.model.policy import resolve_policy
            from recsys.schemas import VOCAB_FILE

            where = split_dir or config.paths.split_dir
            if not (where / VOCAB_FILE).exists():
                raise FileNotFoundError(f"{where / VOCAB_FILE} is missing: run the split stage first")
            policy = resolve_policy(config, Vocab.load(where / VOCAB_FILE), where)
        rows = evaluate_all(config, split_dir, recommenders, split=split, vocab=vocab, device=dev,
                            policy=policy)
    except (FileNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from None
    table = metrics_table(rows, config.evaluate.cutoffs, split, policy.describe())
    if override:
        console.print(f"[bold]{escape(override)}[/bold]")
    # Piped output (logs, CI) is not cut to 80 columns; a terminal shows what fits.
    (console if console.is_terminal else Console(width=max(console.width, 120))).print(table)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        report = {"split": split, "checkpoint": str(checkpoint) if checkpoint else None,
                  "policy": {**policy.rules, "override": override}, "rows": rows}
        json_out.write_text(json.dumps(report, indent=2))
        console.print(f"metrics written to {json_out}")

