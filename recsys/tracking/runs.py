"""A training run recorded in MLflow end to end: params once, metrics per epoch, artifacts, the model.

Training never depends on the store: if it is down before, during or after training, the checkpoint is
kept and the error names the ``recsys register`` command that records it later
(:func:`register_checkpoint`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow  # noqa: E402  (after recsys.tracking.store, which sets MLflow's environment first)

from recsys.config import Config, config_to_yaml, flatten_config
from recsys.schemas import STATS_FILE
from recsys.tracking.lineage import lineage_tags
from recsys.tracking.registry import log_and_register
from recsys.tracking.run_report import (
    metric_key,
    metrics_markdown,
    numeric_items,
    write_epoch_csv,
    write_epoch_plot,
)
from recsys.tracking.store import (
    TrackingStore,
    TrackingUnavailableError,
    connect,
    resolve_tracking_uri,
    with_retries,
)

logger = logging.getLogger(__name__)


class EpochLogger:
    """``on_epoch`` callback for ``train_model``: per-epoch metrics with ``step=epoch``.

    A store that fails mid-training must not stop training: the first failure is remembered, logged once,
    and later epochs are not sent (the checkpoint and history still hold everything).
    """

    def __init__(self, config: Config, run_id: str | None, uri: str) -> None:
        self.config, self.run_id, self.uri = config, run_id, uri
        self.error: Exception | None = None
        self.history: list[dict[str, Any]] = []

    def __call__(self, info: dict[str, Any]) -> None:
        self.history.append(info)
        if self.run_id is None or self.error is not None:
            return
        epoch = int(info.get("epoch", len(self.history)))
        values = epoch_metrics(info)
        try:
            with_retries(lambda: mlflow.log_metrics(values, step=epoch, run_id=self.run_id),
                         self.config, f"logging epoch {epoch}", self.uri)
        except TrackingUnavailableError as exc:
            self.error = exc
            logger.error("tracking stopped at epoch %d, training continues: %s", epoch, exc)


def epoch_metrics(info: Mapping[str, Any]) -> dict[str, float]:
    """``{'train_loss', 'events_per_second', 'epoch_seconds', 'valid_mrr_20', ...}`` from one epoch."""
    values = {k: v for k, v in numeric_items(info).items() if k != "epoch"}
    values.update({f"valid_{k}": v for k, v in numeric_items(info.get("valid") or {}).items()})
    return values


def final_metrics(test_metrics: Mapping[str, Any], baselines: Mapping[str, Mapping[str, Any]]) -> dict:
    """Test metrics of the GRU and every baseline: ``test_gru_mrr_20``, ``test_most_popular_mrr_20``..."""
    values = {f"test_gru_{k}": v for k, v in numeric_items(test_metrics).items()}
    for name, metrics in baselines.items():
        prefix = "test_" + metric_key(name).replace("-", "_").replace(" ", "_").lower()
        values.update({f"{prefix}_{k}": v for k, v in numeric_items(metrics).items()})
    return values


def best_epoch_metrics(history: list[Mapping[str, Any]], best_epoch: int) -> dict[str, float]:
    """``best_epoch`` and ``best_valid_<metric>`` of the epoch whose checkpoint was registered."""
    for entry in history:
        if int(entry.get("epoch", -1)) == int(best_epoch):
            valid = numeric_items(entry.get("valid") or {})
            return {"best_epoch": float(best_epoch), **{f"best_valid_{k}": v for k, v in valid.items()}}
    return {}


def _log_run_artifacts(config: Config, split_dir: Path, history: list[dict], test_metrics: Mapping,
                       baselines: Mapping[str, Mapping], run_id: str) -> None:
    """Resolved config, split stats, per-epoch plot and table, and the final comparison table."""
    with tempfile.TemporaryDirectory(prefix="recsys-run-") as tmp:
        out = Path(tmp)
        (out / "config.yaml").write_text(config_to_yaml(config))
        report = out / "report"
        report.mkdir()
        write_epoch_csv(history, report / "metrics_per_epoch.csv")
        write_epoch_plot(history, report / "metrics_per_epoch.png", config.promote.metric)
        table = {"gru4rec": dict(test_metrics), **{k: dict(v) for k, v in baselines.items()}}
        (report / "test_metrics.md").write_text("# Test metrics\n\n" + metrics_markdown(table))
        data = out / "data"
        data.mkdir()
        stats = Path(split_dir) / STATS_FILE
        if stats.is_file():
            (data / "split_stats.json").write_bytes(stats.read_bytes())
        mlflow.log_artifacts(str(out), run_id=run_id)


def _register_hint(checkpoint: Path | None) -> str:
    if checkpoint is None:
        return "no checkpoint was written"
    return f"the checkpoint is kept at {checkpoint}; run `recsys register --checkpoint {checkpoint}` later"


@contextlib.contextmanager
def checkpoint_dir_lock(checkpoint_dir: Path) -> Iterator[None]:
    """One training per checkpoint directory: a second one would overwrite ``last.pt``/``best.pt``."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    with (checkpoint_dir / ".lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"another training is writing {checkpoint_dir}; give this one its own directory with "
                "--set train.run_name=<name>"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _unfinished_run(store: TrackingStore, checkpoint_dir: Path) -> str | None:
    """The latest run that trained into ``checkpoint_dir`` and did not finish (to continue on resume)."""
    runs = store.client.search_runs(
        [store.experiment_id],
        filter_string=(f"tags.`recsys.checkpoint_dir` = '{checkpoint_dir}' "
                       "and attributes.status != 'FINISHED'"),
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _start_run(config: Config, store: TrackingStore, split_dir: Path, checkpoint_dir: Path,
               resume: bool) -> str:
    """A new run (tags + params once), or on resume the unfinished run of the same checkpoint directory."""
    previous = _unfinished_run(store, checkpoint_dir) if resume else None
    if previous is not None:
        mlflow.start_run(run_id=previous, log_system_metrics=config.tracking.system_metrics)
        logger.info("resuming MLflow run %s", previous)
        return previous
    tags = {"recsys.kind": "train", "recsys.checkpoint_dir": str(checkpoint_dir),
            **lineage_tags(split_dir, config.paths.events_dir, config.train.seed)}
    run = mlflow.start_run(
        experiment_id=store.experiment_id,
        run_name=f"{config.train.run_name}-{config.train.loss}-h{config.model.hidden_size}",
        log_system_metrics=config.tracking.system_metrics, tags=tags,
    )
    try:
        mlflow.log_params(flatten_config(config) | resolved_params(config), run_id=run.info.run_id)
    except Exception:
        mlflow.end_run(status="FAILED")
        raise
    return run.info.run_id


def resolved_params(config: Config) -> dict[str, str]:
    """The values that ``null`` (automatic) settings resolved to for this run, as MLflow params."""
    from recsys.training.evaluate import resolve_exclude_seen
    from recsys.training.train import resolve_mask_seen

    return {
        "resolved.evaluate.exclude_seen": str(resolve_exclude_seen(config)),
        "resolved.train.mask_seen_negatives": str(resolve_mask_seen(config)),
    }


def tracked_training(
    config: Config, split_dir: Path | None = None, resume: bool = False, checkpoint_dir: Path | None = None
) -> dict[str, Any]:
    """Train GRU4Rec inside an MLflow run, log everything, register the model as the new challenger.

    Returns ``{"run_id", "model_version", "registered_model", "metrics", "checkpoint", "tracking_uri"}``
    plus the plain training summary (``test_metrics``, ``baseline_metrics``, ``history``, ``best_epoch``,
    ``stopped_early``, ``device``). If the store is unreachable (before, during or after training)
    training still completes and a :class:`TrackingUnavailableError` names the kept checkpoint and the
    ``recsys register`` command. ``resume=True`` continues both the checkpoint (``train_model``) and its
    unfinished MLflow run. ``checkpoint_dir`` defaults to ``checkpoints/<train.run_name>``.
    """
    from recsys.training.train import train_model

    split_dir = Path(split_dir) if split_dir is not None else config.paths.split_dir
    checkpoint_dir = Path(checkpoint_dir or config.paths.checkpoints_dir / config.train.run_name).resolve()
    uri = resolve_tracking_uri(config)
    with checkpoint_dir_lock(checkpoint_dir):
        run_id: str | None = None
        start_error: TrackingUnavailableError | None = None
        try:
            store = connect(config)
            run_id = with_retries(lambda: _start_run(config, store, split_dir, checkpoint_dir, resume),
                                  config, "starting the run", uri)
            logger.info("MLflow run %s in experiment %r at %s", run_id, store.experiment, uri)
        except TrackingUnavailableError as exc:
            logger.error("training without tracking: %s", exc)
            start_error = exc

        epochs = EpochLogger(config, run_id, uri)
        try:
            result = train_model(config, split_dir=split_dir, checkpoint_dir=checkpoint_dir, resume=resume,
                                 on_epoch=epochs)
        except BaseException:
            if run_id is not None:
                with contextlib.suppress(Exception):
                    mlflow.end_run(status="FAILED")
            raise

    checkpoint = Path(result.best_checkpoint)
    metrics = final_metrics(result.test_metrics, result.baseline_metrics)
    metrics.update(best_epoch_metrics(list(result.history), getattr(result, "best_epoch", 0)))
    if getattr(result, "refit_epochs", 0):  # the registered model also trained on the validation events
        metrics["refit_epochs"] = float(result.refit_epochs)
    if run_id is None:
        raise TrackingUnavailableError(f"{start_error}; training finished, {_register_hint(checkpoint)}")
    try:
        with_retries(lambda: _finish_run(config, split_dir, result, metrics, run_id), config,
                     "logging final metrics and artifacts", uri)
        version = with_retries(lambda: log_and_register(config, checkpoint, run_id), config,
                               "logging and registering the model", uri)
    except TrackingUnavailableError as exc:
        with contextlib.suppress(Exception):
            mlflow.end_run(status="FAILED")
        raise TrackingUnavailableError(f"{exc}; {_register_hint(checkpoint)}") from exc
    card = _model_card_safely(config, split_dir, result, metrics, run_id, version, uri)
    mlflow.end_run(status="FINISHED")
    if epochs.error is not None:
        logger.warning("some epochs were not logged (%s); the final metrics and model were", epochs.error)
    return {
        "slices": (result.extra or {}).get("slices") or {},
        "report_path": str(training_report_path(config, run_id)),
        "model_card": card,
        "run_id": run_id,
        "model_version": str(version.version),
        "registered_model": version.name,
        "metrics": metrics,
        "checkpoint": str(checkpoint),
        "tracking_uri": uri,
        "test_metrics": dict(result.test_metrics),
        "baseline_metrics": {k: dict(v) for k, v in result.baseline_metrics.items()},
        "history": list(result.history),
        "best_epoch": int(getattr(result, "best_epoch", 0)),
        "stopped_early": bool(getattr(result, "stopped_early", False)),
        "device": str(result.device),
        "n_items": int(result.n_items),
    }


def _finish_run(config: Config, split_dir: Path, result: Any, metrics: dict[str, float], run_id: str) -> None:
    mlflow.set_tags({"device": str(result.device), "n_items": str(result.n_items),
                     "checkpoint": str(result.best_checkpoint)})
    mlflow.log_metrics(metrics, run_id=run_id)
    _log_run_artifacts(config, split_dir, list(result.history), result.test_metrics,
                       result.baseline_metrics, run_id)
    _log_quality(config, split_dir, result, run_id)


def slice_metrics(slices: Mapping[str, Any], model: str = "gru4rec") -> dict[str, float]:
    """``test_gru_slice_<slice>_<metric>_20`` for every slice of ``model`` (MLflow-safe names)."""
    out: dict[str, float] = {}
    for name, row in ((slices.get("models") or {}).get(model) or {}).items():
        for key in ("recall@20", "mrr@20", "ndcg@20"):
            value = row.get(key)
            if isinstance(value, float) and value == value:  # NaN: an empty slice, nothing to log
                out[metric_key(f"test_gru_slice_{name}_{key}").replace(":", "_")] = value
    return out


def training_report_path(config: Config, run_id: str) -> Path:
    """Where the training run's HTML report is kept on disk (beside the MLflow artifact)."""
    return config.paths.data_root / "reports" / "training" / f"{run_id}.html"


def _log_quality(config: Config, split_dir: Path, result: Any, run_id: str) -> None:
    """Slice metrics and intervals (metrics + JSON) and the self-contained HTML training report."""
    import json

    from recsys.data.vocab import Vocab
    from recsys.schemas import VOCAB_FILE
    from recsys.tracking.lineage import read_split_stats
    from recsys.tracking.training_report import write_training_report

    slices = (result.extra or {}).get("slices") or {}
    if slices:
        mlflow.log_metrics(slice_metrics(slices), run_id=run_id)
        mlflow.log_text(json.dumps(slices, indent=2, default=str), "report/slices.json", run_id=run_id)
    stats = read_split_stats(split_dir)
    vocab_file = Path(split_dir) / VOCAB_FILE
    counts = Vocab.load(vocab_file).counts if vocab_file.is_file() else None
    facts = {"MLflow run": run_id, "data window": f"{stats.get('time_min')} → {stats.get('time_max')}",
             "test cutoff": stats.get("test_cutoff"), "protocol": stats.get("protocol"),
             "device": result.device, "best epoch": getattr(result, "best_epoch", None),
             "catalogue items": result.n_items}
    path = write_training_report(
        training_report_path(config, run_id),
        title=f"Training report — {config.train.run_name} ({run_id[:8]})",
        facts=facts, test_metrics=result.test_metrics, baseline_metrics=result.baseline_metrics,
        slices=slices, history=list(result.history), item_counts=counts,
    )
    mlflow.log_artifact(str(path), "report", run_id=run_id)


def _model_card_safely(config: Config, split_dir: Path, result: Any, metrics: dict[str, float], run_id: str,
                       version: Any, uri: str) -> dict[str, Any]:
    """Write the version's model card (description + run artifacts); a failure is logged, never fatal."""
    try:
        return with_retries(lambda: log_model_card(config, split_dir, result, metrics, run_id, version),
                            config, "writing the model card", uri)
    except Exception as exc:  # the model is registered; a missing card must not undo that
        logger.error("model card for version %s not written: %s", getattr(version, "version", "?"), exc)
        return {}


def log_model_card(config: Config, split_dir: Path, result: Any, metrics: dict[str, float], run_id: str,
                   version: Any) -> dict[str, Any]:
    """The model card of a registered version: its description, and ``model_card/`` run artifacts."""
    from mlflow import MlflowClient

    from recsys.tracking.model_card import build_card, card_json, card_markdown, description

    summary = {"test_metrics": result.test_metrics, "baseline_metrics": result.baseline_metrics,
               "history": list(result.history), "best_epoch": getattr(result, "best_epoch", 0),
               "device": result.device, "n_items": result.n_items, "metrics": metrics,
               "slices": (result.extra or {}).get("slices") or {}}
    lineage = (lineage_tags(split_dir, config.paths.events_dir, config.train.seed)
               if Path(split_dir).is_dir() else {})
    card = build_card(config, name=version.name, version=str(version.version), run_id=run_id,
                      split_dir=split_dir, summary=summary, lineage=lineage)
    mlflow.log_text(card_json(card), "model_card/model_card.json", run_id=run_id)
    mlflow.log_text(card_markdown(card), "model_card/model_card.md", run_id=run_id)
    uri = resolve_tracking_uri(config)
    MlflowClient(tracking_uri=uri, registry_uri=uri).update_model_version(
        version.name, str(version.version), description=description(card))
    return card


def register_checkpoint(config: Config, checkpoint_path: Path) -> dict[str, Any]:
    """Record an existing checkpoint (e.g. trained while the tracking server was down) as a run + version.

    Params come from the checkpoint's own config (what trained it), metrics from what it stored; the
    current config decides where it is tracked and under which registered model name.
    """
    from recsys.model.checkpoint import load_checkpoint

    checkpoint_path = Path(checkpoint_path)
    if not checkpoint_path.is_file():
        raise FileNotFoundError(f"{checkpoint_path} does not exist")
    ckpt = load_checkpoint(checkpoint_path)  # fail before touching the store if it is unreadable
    store = connect(config)
    tags = {"recsys.kind": "register", "checkpoint": str(checkpoint_path.resolve()),
            "seed": str(ckpt.config.train.seed), "n_items": str(ckpt.n_items)}
    if config.paths.split_dir.is_dir():
        tags.update(lineage_tags(config.paths.split_dir, config.paths.events_dir, ckpt.config.train.seed))
    run = with_retries(
        lambda: mlflow.start_run(experiment_id=store.experiment_id, run_name="register", tags=tags),
        config, "starting the run", store.uri,
    )
    try:
        mlflow.log_params(flatten_config(ckpt.config))
        metrics = numeric_items(ckpt.metrics)
        if metrics:
            mlflow.log_metrics(metrics, step=ckpt.epoch)
        for entry in (ckpt.extra or {}).get("history", []):
            mlflow.log_metrics(epoch_metrics(entry), step=int(entry.get("epoch", 0)))
        version = log_and_register(config, checkpoint_path, run.info.run_id)
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    # the card of a checkpoint registered later: what it stored (no test evaluation, so no slices)
    recorded = SimpleNamespace(test_metrics={}, baseline_metrics={}, best_epoch=ckpt.epoch, device="",
                               history=(ckpt.extra or {}).get("history", []), n_items=ckpt.n_items, extra={})
    _model_card_safely(config, config.paths.split_dir, recorded, metrics, run.info.run_id, version, store.uri)
    mlflow.end_run(status="FINISHED")
    return {"run_id": run.info.run_id, "model_version": str(version.version),
            "registered_model": version.name, "metrics": metrics, "checkpoint": str(checkpoint_path),
            "tracking_uri": store.uri}
