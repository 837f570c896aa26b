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
        mlflow.log_params(flatten_config(config) | resolved_params(config, split_dir), run_id=run.info.run_id)
    except Exception:
        mlflow.end_run(status="FAILED")
        raise
    return run.info.run_id


def resolved_params(config: Config, split_dir: Path | None = None) -> dict[str, str]:
    """The values that automatic settings resolved to for this run (the policy from the split's record),
    as MLflow params."""
    from recsys.data.vocab import Vocab
    from recsys.model.policy import resolve_mask_seen, resolve_policy
    from recsys.schemas import VOCAB_FILE

    split_dir = Path(split_dir) if split_dir is not None else config.paths.split_dir
    if not (split_dir / VOCAB_FILE).is_file():
        return {}  # training itself reports the missing split
    policy = resolve_policy(config, Vocab.load(split_dir / VOCAB_FILE), split_dir)
    return {
        "resolved.policy.exclude": policy.exclude,
        "resolved.policy.continue_series": str(policy.continues),
        "resolved.train.mask_seen_negatives": str(resolve_mask_seen(config, policy)),
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
    mlflow.end_run(status="FINISHED")
    if epochs.error is not None:
        logger.warning("some epochs were not logged (%s); the final metrics and model were", epochs.error)
    return {
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
    mlflow.end_run(status="FINISHED")
    return {"run_id": run.info.run_id, "model_version": str(version.version),
            "registered_model": version.name, "metrics": metrics, "checkpoint": str(checkpoint_path),
            "tracking_uri": store.uri}
