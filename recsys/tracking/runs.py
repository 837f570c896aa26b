"""A training run recorded in MLflow end to end: params once, metrics per epoch, artifacts, the model.

Training never depends on the store: if it is down before, during or after training, the checkpoint is
kept and the error names the ``recsys register`` command that records it later
(:func:`register_checkpoint`). Epoch metrics that cannot be sent are buffered and sent once the store
answers again (at the latest when training ends, within ``tracking.retry_window_seconds``).

Crash safety: every checkpoint records the id of the run that trained it, so ``--resume`` continues that
run (never "the latest unfinished one"); runs left RUNNING by a killed process are closed as FAILED by
the next training of the same checkpoint directory (which holds its lock, so they are certainly dead);
registration is idempotent per run (recsys.tracking.registry).
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
from mlflow import MlflowClient

from recsys.config import Config, config_to_yaml, flatten_config, redact
from recsys.schemas import STATS_FILE
from recsys.tracking.lineage import lineage_tags
from recsys.tracking.registry import check_registrable, file_sha256, log_and_register, version_of_run
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
    is_transient,
    resolve_tracking_uri,
    try_once,
    with_retries,
)

logger = logging.getLogger(__name__)

RUN_ID_KEY = "mlflow_run_id"  # in every checkpoint's extra: the run that trained it
SHA_RUN_TAG = "recsys.checkpoint_sha256"  # on runs made by `recsys register`: which file they record


class EpochLogger:
    """``on_epoch`` callback for ``train_model``: per-epoch metrics with ``step=epoch``.

    A store that fails mid-training must not stop or slow training: each epoch is tried once; what could
    not be sent stays in ``pending`` and goes out with the next epoch that reaches the store, or from
    :meth:`flush` (with the full retry window) when training ends.
    """

    def __init__(self, config: Config, run_id: str | None, uri: str) -> None:
        self.config, self.run_id, self.uri = config, run_id, uri
        self.error: BaseException | None = None  # the last failure, while epochs are pending
        self.history: list[dict[str, Any]] = []
        self.pending: list[tuple[int, dict[str, float]]] = []

    def __call__(self, info: dict[str, Any]) -> None:
        self.history.append(info)
        if self.run_id is None:
            return
        self.pending.append((int(info.get("epoch", len(self.history))), epoch_metrics(info)))
        self._send(wait=False)

    def flush(self) -> None:
        """Send every pending epoch, retrying for the configured window (TrackingUnavailableError after)."""
        self._send(wait=True)

    def _send(self, wait: bool) -> None:
        while self.pending and self.run_id is not None:
            epoch, values = self.pending[0]

            def send(values: dict[str, float] = values, epoch: int = epoch, run: str = self.run_id) -> None:
                mlflow.log_metrics(values, step=epoch, run_id=run)

            if wait:
                with_retries(send, self.config, f"logging epoch {epoch}", self.uri)
            else:
                _, error = try_once(send)
                if error is not None:
                    if self.error is None:
                        logger.warning("tracking store unreachable at epoch %d; training continues and the "
                                       "epoch metrics are sent when it answers again", epoch)
                    self.error = error
                    return
            self.pending.pop(0)
        self.error = None


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


def recorded_run_id(checkpoint: Path) -> str | None:
    """The run id a checkpoint recorded (None for a missing, unreadable or older checkpoint)."""
    from recsys.model.checkpoint import CheckpointError, load_checkpoint

    if not Path(checkpoint).is_file():
        return None
    try:
        return load_checkpoint(checkpoint).extra.get(RUN_ID_KEY)
    except (CheckpointError, KeyError):
        return None


def _existing_run(store: TrackingStore, run_id: str | None) -> Any | None:
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        return store.client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def close_abandoned_runs(store: TrackingStore, checkpoint_dir: Path, keep: str | None = None) -> list[str]:
    """Mark FAILED the runs of ``checkpoint_dir`` still RUNNING: the caller holds the directory's lock, so
    whatever process was training into it has died. Returns their ids."""
    runs = store.client.search_runs(
        [store.experiment_id],
        filter_string=f"tags.`recsys.checkpoint_dir` = '{checkpoint_dir}' and attributes.status = 'RUNNING'",
        max_results=100,
    )
    closed = []
    for run in runs:
        if run.info.run_id == keep:
            continue
        store.client.set_tag(run.info.run_id, "recsys.closed",
                             "left RUNNING by a process that died; closed by the next training")
        store.client.set_terminated(run.info.run_id, status="FAILED")
        closed.append(run.info.run_id)
        logger.warning("closed MLflow run %s as FAILED: its training process died", run.info.run_id)
    return closed


def _start_run(config: Config, store: TrackingStore, split_dir: Path, checkpoint_dir: Path,
               resume: bool) -> str:
    """A new run (tags + params once), or on resume the run recorded in ``last.pt``; abandoned runs of the
    checkpoint directory are closed as FAILED first."""
    previous = recorded_run_id(checkpoint_dir / "last.pt") if resume else None
    if previous is not None and _existing_run(store, previous) is None:
        logger.warning("run %s recorded in the checkpoint is not in %s: starting a new run", previous,
                       redact(store.uri))
        previous = None
    close_abandoned_runs(store, checkpoint_dir, keep=previous)
    if previous is not None:
        mlflow.start_run(run_id=previous, log_system_metrics=config.tracking.system_metrics)
        logger.info("resuming MLflow run %s (recorded in %s)", previous, checkpoint_dir / "last.pt")
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


def _end_run(config: Config, status: str, uri: str) -> None:
    """End the active run, retrying through an outage (a run must not stay RUNNING after its process).

    ``mlflow.end_run`` takes the run off the active stack before telling the store, so a failure there
    is finished with retried ``set_terminated`` calls rather than by calling it again.
    """
    active = mlflow.active_run()
    if active is None:
        return
    try:
        mlflow.end_run(status=status)
    except Exception as exc:
        if not is_transient(exc):
            raise
        client = MlflowClient(tracking_uri=uri)
        with_retries(lambda: client.set_terminated(active.info.run_id, status=status), config,
                     f"ending the run as {status}", uri)


def run_url(config: Config, store: TrackingStore, run_id: str) -> str:
    """Link to a run in the MLflow UI a person can open: ``tracking.ui_url``, else the server (redacted),
    else ``recsys ui``'s address for the embedded store."""
    base = config.tracking.ui_url or ("http://127.0.0.1:5000" if store.embedded else redact(store.uri))
    return f"{base.rstrip('/')}/#/experiments/{store.experiment_id}/runs/{run_id}"


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
        "resolved.policy.continuation_slots": str(policy.slots),
        "resolved.train.mask_seen_negatives": str(resolve_mask_seen(config, policy)),
    }


def tracked_training(
    config: Config, split_dir: Path | None = None, resume: bool = False, checkpoint_dir: Path | None = None
) -> dict[str, Any]:
    """Train GRU4Rec inside an MLflow run, log everything, register the model as the new challenger.

    Returns ``{"run_id", "model_version", "registered_model", "metrics", "checkpoint", "tracking_uri"}``
    (the URI redacted) plus the plain training summary (``test_metrics``, ``baseline_metrics``,
    ``history``, ``best_epoch``, ``stopped_early``, ``device``). ``model_version`` is the version this run
    registered: the one a promotion of this training must judge. If the store is unreachable (before,
    during or after training, past the retry window) training still completes and a
    :class:`TrackingUnavailableError` names the kept checkpoint and the ``recsys register`` command.
    ``resume=True`` continues both the checkpoint (``train_model``) and the run recorded in it.
    ``checkpoint_dir`` defaults to ``checkpoints/<train.run_name>`` (always under the data root).
    """
    from recsys.config import confined
    from recsys.training.train import train_model

    split_dir = Path(split_dir) if split_dir is not None else config.paths.split_dir
    checkpoint_dir = Path(checkpoint_dir or config.paths.checkpoints_dir / config.train.run_name)
    checkpoint_dir = confined(checkpoint_dir, config.paths.data_root, "checkpoint directory")
    uri = resolve_tracking_uri(config)
    with checkpoint_dir_lock(checkpoint_dir):
        run_id: str | None = None
        start_error: TrackingUnavailableError | None = None
        try:
            store = connect(config)
            run_id = with_retries(lambda: _start_run(config, store, split_dir, checkpoint_dir, resume),
                                  config, "starting the run", uri)
            logger.info("MLflow run %s in experiment %r: %s", run_id, store.experiment,
                        run_url(config, store, run_id))
        except TrackingUnavailableError as exc:
            logger.error("training without tracking: %s", exc)
            start_error = exc

        epochs = EpochLogger(config, run_id, uri)
        try:
            result = train_model(config, split_dir=split_dir, checkpoint_dir=checkpoint_dir, resume=resume,
                                 on_epoch=epochs, checkpoint_tags={RUN_ID_KEY: run_id} if run_id else None)
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
        epochs.flush()
        with_retries(lambda: _finish_run(config, split_dir, result, metrics, run_id), config,
                     "logging final metrics and artifacts", uri)
        version = with_retries(lambda: log_and_register(config, checkpoint, run_id), config,
                               "logging and registering the model", uri)
        card = _model_card_safely(config, split_dir, result, metrics, run_id, version, uri)
        _end_run(config, "FINISHED", uri)
    except BaseException as exc:
        with contextlib.suppress(Exception):  # unreachable: the next training closes it as FAILED
            mlflow.end_run(status="FAILED")
        if isinstance(exc, TrackingUnavailableError):
            raise TrackingUnavailableError(f"{exc}; {_register_hint(checkpoint)}") from exc
        raise
    return {
        "slices": (result.extra or {}).get("slices") or {},
        "report_path": str(training_report_path(config, run_id)),
        "model_card": card,
        "run_id": run_id,
        "model_version": str(version.version),
        "registered_model": version.name,
        "metrics": metrics,
        "checkpoint": str(checkpoint),
        "tracking_uri": redact(uri),
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
               "slices": (result.extra or {}).get("slices") or {},
               "policy": getattr(result, "policy", "") or None}
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


def _register_run(config: Config, store: TrackingStore, checkpoint_path: Path, ckpt: Any,
                  sha: str) -> tuple[str, bool]:
    """The run a checkpoint is registered under, and whether it is new: the training run the checkpoint
    recorded, else an earlier ``recsys register`` run of the same file, else a new one."""
    recorded = ckpt.extra.get(RUN_ID_KEY)
    if _existing_run(store, recorded) is not None:
        return recorded, False
    earlier = store.client.search_runs([store.experiment_id], filter_string=f"tags.`{SHA_RUN_TAG}` = '{sha}'",
                                       order_by=["attributes.start_time ASC"], max_results=1)
    if earlier:
        return earlier[0].info.run_id, False
    tags = {"recsys.kind": "register", "checkpoint": str(checkpoint_path.resolve()), SHA_RUN_TAG: sha,
            "seed": str(ckpt.config.train.seed), "n_items": str(ckpt.n_items)}
    if config.paths.split_dir.is_dir():
        tags.update(lineage_tags(config.paths.split_dir, config.paths.events_dir, ckpt.config.train.seed))
    run = store.client.create_run(store.experiment_id, run_name="register", tags=tags)
    return run.info.run_id, True


def register_checkpoint(config: Config, checkpoint_path: Path) -> dict[str, Any]:
    """Record an existing checkpoint (e.g. trained while the tracking server was down) as a run + version.

    Params come from the checkpoint's own config (what trained it), metrics from what it stored; the
    current config decides where it is tracked and under which registered model name. Idempotent: a
    checkpoint whose run already has a version returns that version (a second call, or one after a kill,
    never makes another). Unreadable checkpoints and non-finite weights are refused before the store is
    touched.
    """
    checkpoint_path = Path(checkpoint_path)
    if not checkpoint_path.is_file():
        raise FileNotFoundError(f"{checkpoint_path} does not exist")
    ckpt = check_registrable(checkpoint_path)
    sha = file_sha256(checkpoint_path)
    store = connect(config)
    name = config.tracking.registered_model
    run_id, new = with_retries(lambda: _register_run(config, store, checkpoint_path, ckpt, sha), config,
                               "finding the checkpoint's run", store.uri)
    metrics = numeric_items(ckpt.metrics)
    existing = with_retries(lambda: version_of_run(store.client, name, run_id), config,
                            "looking up the run's version", store.uri)
    if existing is None or not existing.tags.get("checkpoint_sha256"):  # none yet, or a killed registration
        with_retries(lambda: mlflow.start_run(run_id=run_id), config, "opening the run", store.uri)
        try:
            if new:
                mlflow.log_params(flatten_config(ckpt.config))
                if metrics:
                    mlflow.log_metrics(metrics, step=ckpt.epoch)
                for entry in (ckpt.extra or {}).get("history", []):
                    mlflow.log_metrics(epoch_metrics(entry), step=int(entry.get("epoch", 0)))
            version = with_retries(lambda: log_and_register(config, checkpoint_path, run_id), config,
                                   "logging and registering the model", store.uri)
            # the card of a checkpoint registered later: what it stored (no test evaluation, no slices)
            recorded = SimpleNamespace(test_metrics={}, baseline_metrics={}, best_epoch=ckpt.epoch, device="",
                                       history=(ckpt.extra or {}).get("history", []), n_items=ckpt.n_items,
                                       extra={}, policy=ckpt.policy.describe())
            _model_card_safely(config, config.paths.split_dir, recorded, metrics, run_id, version, store.uri)
            _end_run(config, "FINISHED", store.uri)
        except BaseException:
            with contextlib.suppress(Exception):
                mlflow.end_run(status="FAILED")
            raise
    else:
        version = existing
        logger.info("%s is already registered as %s version %s (run %s)", checkpoint_path, name,
                    version.version, run_id)
    return {"run_id": run_id, "model_version": str(version.version),
            "registered_model": version.name, "metrics": metrics, "checkpoint": str(checkpoint_path),
            "tracking_uri": redact(store.uri)}
