"""Model registry: every trained model becomes a version with alias ``challenger``; ``promote`` gates
the ``champion`` alias on the temporal holdout.

Aliases, never stages (DESIGN.md). Consumers (scoring, serving) ask :func:`resolve_model` for a checkpoint
path given ``models:/NAME@alias``, ``models:/NAME/VERSION``, ``runs:/RUN/PATH`` or a local path, so the
champion can be moved without touching them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsys.config import Config, flatten_config

if TYPE_CHECKING:
    from recsys.tracking import TrackingStore

# recsys.tracking (and so mlflow, ~4 s to import) is imported inside the functions that talk to the store:
# resolving a local checkpoint path must stay cheap for scoring.

logger = logging.getLogger(__name__)

CHALLENGER = "challenger"
CHAMPION = "champion"
CHECKPOINT_IN_MODEL = Path("artifacts") / "checkpoint.pt"  # inside a downloaded pyfunc model directory
POPULAR = "most-popular"
TAG_VALUE_LIMIT = 4500  # model version tags hold at most 5000 characters


@dataclass(frozen=True)
class ResolvedModel:
    checkpoint_path: Path
    name: str
    version: str
    run_id: str
    uri: str


@dataclass
class PromotionDecision:
    promoted: bool
    reason: str
    metric: str
    challenger_version: str | None
    champion_version: str | None  # the champion before the decision
    challenger_metrics: dict[str, float] = field(default_factory=dict)
    champion_metrics: dict[str, float] = field(default_factory=dict)
    popular_metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RegistryError(RuntimeError):
    """A model URI that names nothing, or a registry without the version asked for."""


# --- registering -----------------------------------------------------------------------------------


def log_and_register(config: Config, checkpoint: Path, run_id: str) -> Any:
    """Log ``checkpoint`` as the pyfunc model of the active run ``run_id``, register it, alias ``challenger``.

    Returns the MLflow ``ModelVersion``.
    """
    from mlflow import MlflowClient

    from recsys.model.pyfunc import log_pyfunc_model
    from recsys.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(config)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = config.tracking.registered_model
    info = log_pyfunc_model(checkpoint, registered_model_name=name)
    version = str(info.registered_model_version)
    client.set_model_version_tag(name, version, "run_id", run_id)
    client.set_model_version_tag(name, version, "checkpoint", str(checkpoint))
    client.set_registered_model_alias(name, CHALLENGER, version)
    logger.info("registered %s version %s as @%s (run %s)", name, version, CHALLENGER, run_id)
    return client.get_model_version(name, version)


def register_checkpoint(config: Config, checkpoint_path: Path) -> dict[str, Any]:
    """Record an existing checkpoint (e.g. trained while the tracking server was down) as a run + version.

    Params come from the checkpoint's own config (what trained it), metrics from what it stored; the
    current config decides where it is tracked and under which registered model name.
    """
    import mlflow

    from recsys.lineage import lineage_tags
    from recsys.model.checkpoint import load_checkpoint
    from recsys.run_report import numeric_items
    from recsys.tracking import connect, epoch_metrics, with_retries

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


# --- resolving a model URI -------------------------------------------------------------------------


def _download(config: Config, artifact_uri: str, cache_key: str) -> Path:
    """Download a model directory once into ``mlflow_dir/downloads/<cache_key>`` (atomic rename)."""
    import mlflow

    from recsys.tracking import resolve_tracking_uri, with_retries

    store_key = hashlib.sha256(resolve_tracking_uri(config).encode()).hexdigest()[:12]  # one cache per store
    target = config.paths.mlflow_dir / "downloads" / store_key / cache_key
    if (target / CHECKPOINT_IN_MODEL).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        local = with_retries(
            lambda: mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(staging)),
            config, f"downloading {artifact_uri}",
        )
        local = Path(local)
        if not (local / CHECKPOINT_IN_MODEL).is_file():
            raise RegistryError(f"{artifact_uri} holds no {CHECKPOINT_IN_MODEL}: not a recsys model")
        try:
            os.replace(local, target)
        except OSError:  # another process published it first
            if not (target / CHECKPOINT_IN_MODEL).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _local(uri: str) -> ResolvedModel | None:
    path = Path(uri).expanduser()
    if path.is_file():
        return ResolvedModel(path.resolve(), name="", version="", run_id="", uri=str(path))
    if (path / CHECKPOINT_IN_MODEL).is_file():
        checkpoint = (path / CHECKPOINT_IN_MODEL).resolve()
        return ResolvedModel(checkpoint, name="", version="", run_id="", uri=str(path))
    return None


def get_version(store: TrackingStore, config: Config, name: str, ref: str) -> Any:
    """A ``ModelVersion`` by alias (``@champion``) or number; :class:`RegistryError` when there is none."""
    from mlflow.exceptions import MlflowException

    from recsys.tracking import with_retries

    client = store.client
    try:
        if ref.startswith("@"):
            return with_retries(lambda: client.get_model_version_by_alias(name, ref[1:]), config,
                                f"looking up {name}{ref}", store.uri)
        return with_retries(lambda: client.get_model_version(name, ref), config,
                            f"looking up {name}/{ref}", store.uri)
    except MlflowException as exc:
        raise RegistryError(f"registered model {name!r} has no version {ref!r} in {store.uri}: "
                            f"{str(exc).splitlines()[0]}") from exc


def resolve_model(config: Config, model_uri: str) -> ResolvedModel:
    """The local checkpoint file behind a model URI (downloading the model once when needed)."""
    if not model_uri.startswith(("models:/", "runs:/")):
        local = _local(model_uri)
        if local is None:
            raise RegistryError(f"{model_uri!r} is neither a model URI (models:/NAME@alias, models:/NAME/3, "
                                "runs:/RUN_ID/model) nor an existing checkpoint file or model directory")
        return local
    from recsys.tracking import connect

    store = connect(config)
    if model_uri.startswith("runs:/"):
        run_id, _, path = model_uri.removeprefix("runs:/").partition("/")
        local = _download(config, model_uri, f"runs/{run_id}/{path.strip('/') or 'root'}")
        return ResolvedModel(local / CHECKPOINT_IN_MODEL, name="", version="", run_id=run_id, uri=model_uri)
    rest = model_uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        mv = get_version(store, config, name, "@" + alias)
    else:
        name, _, number = rest.partition("/")
        if not number:
            raise RegistryError(f"{model_uri!r}: give a version or alias, e.g. models:/{name}@{CHAMPION}")
        mv = get_version(store, config, name, number)
    local = _download(config, f"models:/{name}/{mv.version}", f"models/{name}/{mv.version}")
    return ResolvedModel(local / CHECKPOINT_IN_MODEL, name=name, version=str(mv.version),
                         run_id=mv.run_id or "", uri=model_uri)


# --- promotion -------------------------------------------------------------------------------------


def gate_value(metrics: dict[str, float], metric: str) -> float:
    """``metric`` over every test target: targets a model could not rank (items outside its vocabulary,
    no known history) count as misses, so models with different vocabularies are compared fairly."""
    from recsys.evaluate import LOST_TARGET_KEYS

    value = float(metrics[metric])
    n = float(metrics.get("n_queries", 0))
    lost = sum(float(metrics.get(k, 0)) for k in LOST_TARGET_KEYS)
    return value * n / (n + lost) if n + lost > 0 else 0.0


def _evaluate_version(
    config: Config, version: Any, label: str, with_popular: bool
) -> dict[str, dict[str, float]]:
    """Test-split metrics of one registered version (and most-popular under the same vocabulary)."""
    from recsys.device import resolve_device
    from recsys.evaluate import evaluate_all
    from recsys.model.checkpoint import build_model, load_checkpoint
    from recsys.model.recommender import GRU4RecRecommender

    resolved = resolve_model(config, f"models:/{version.name}/{version.version}")
    device = resolve_device(config.train.device)
    ckpt = load_checkpoint(resolved.checkpoint_path, map_location=device)
    rec = GRU4RecRecommender(build_model(ckpt, device), device, name=label)
    rows = evaluate_all(config, config.paths.split_dir, {label: rec}, split="test",
                        baselines=with_popular, vocab=ckpt.vocab, device=device)
    for value in rows[label].values():
        if isinstance(value, float) and math.isnan(value):
            raise ValueError(f"{label} produced NaN metrics")
    return rows


def _json_tag(metrics: dict[str, float]) -> str:
    text = json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()},
                      sort_keys=True)
    return text[:TAG_VALUE_LIMIT]


def decide(metric: str, min_improvement: float, challenger: dict[str, float], popular: dict[str, float],
           champion: dict[str, float] | None, champion_version: str | None) -> tuple[bool, str]:
    """The gate: beat most-popular, and (when a champion exists) beat it by the relative margin.

    Values in the reason are :func:`gate_value` (the metric over all test targets, marked ``[all]``).
    """
    label = f"{metric}[all]"
    c, p = gate_value(challenger, metric), gate_value(popular, metric)
    if not c > p:
        return False, f"challenger {label}={c:.4f} does not beat most-popular ({p:.4f})"
    if champion is None:
        return True, f"first champion: {label}={c:.4f} beats most-popular ({p:.4f})"
    ch = gate_value(champion, metric)
    needed = ch * (1.0 + min_improvement)
    gain = (c - ch) / ch if ch > 0 else math.inf
    if c > needed:
        return True, (f"challenger {label}={c:.4f} beats champion v{champion_version} ({ch:.4f}) by "
                      f"{gain:+.2%} (margin {min_improvement:.2%}) and most-popular ({p:.4f})")
    if c <= ch:
        return False, (f"challenger {label}={c:.4f} is not better than champion v{champion_version} "
                       f"({ch:.4f})")
    return False, (f"challenger {label}={c:.4f} beats champion v{champion_version} ({ch:.4f}) by only "
                   f"{gain:+.2%}, below the required margin {min_improvement:.2%}")


def promote(config: Config) -> PromotionDecision:
    """Compare ``@challenger`` with ``@champion`` (and most-popular) on the test split; move ``@champion``.

    Both models are evaluated now, on the same split directory, through recsys.evaluate. A challenger that
    cannot be downloaded, loaded or evaluated is rejected; a champion that cannot be is treated as absent
    (the reason says so). The decision, the metric sets and the reason become tags of the challenger version.
    """
    from recsys.tracking import connect, with_retries
    metric = config.promote.metric
    cutoff = metric.partition("@")[2]
    if not cutoff.isdigit() or int(cutoff) not in config.evaluate.cutoffs:
        raise ValueError(f"promote.metric={metric!r} must be <metric>@K with K in evaluate.cutoffs "
                         f"{config.evaluate.cutoffs}")
    store = connect(config)
    name = config.tracking.registered_model
    challenger = get_version(store, config, name, "@" + CHALLENGER)
    try:
        champion = get_version(store, config, name, "@" + CHAMPION)
    except RegistryError:
        champion = None
    decision = PromotionDecision(False, "", metric, str(challenger.version),
                                 str(champion.version) if champion is not None else None)
    if champion is not None and str(champion.version) == str(challenger.version):
        decision.reason = f"version {challenger.version} is already the champion"
        return decision
    try:
        rows = _evaluate_version(config, challenger, CHALLENGER, with_popular=True)
        decision.challenger_metrics = rows[CHALLENGER]
        decision.popular_metrics = rows[POPULAR]
    except Exception as exc:  # anything wrong with the challenger's artifact keeps it out
        logger.exception("challenger version %s could not be evaluated", challenger.version)
        decision.reason = f"challenger v{challenger.version} could not be loaded or evaluated: {exc}"
        _record(store, config, name, decision)
        return decision
    champion_note = ""
    if champion is not None:
        try:
            decision.champion_metrics = _evaluate_version(config, champion, CHAMPION,
                                                          with_popular=False)[CHAMPION]
        except Exception as exc:
            logger.exception("champion version %s could not be evaluated", champion.version)
            champion_note = (f" (champion v{champion.version} could not be evaluated: {exc}; "
                             "treated as absent)")
    decision.promoted, decision.reason = decide(
        metric, config.promote.min_improvement, decision.challenger_metrics, decision.popular_metrics,
        decision.champion_metrics or None, decision.champion_version,
    )
    decision.reason += champion_note
    if decision.promoted:
        with_retries(lambda: store.client.set_registered_model_alias(name, CHAMPION, str(challenger.version)),
                     config, "moving the champion alias", store.uri)
        if champion is not None:
            store.client.set_model_version_tag(name, str(champion.version), "promotion.replaced_by",
                                               str(challenger.version))
    _record(store, config, name, decision)
    logger.info("promotion of %s v%s: %s — %s", name, challenger.version,
                "PROMOTED" if decision.promoted else "kept out", decision.reason)
    return decision


def _record(store: TrackingStore, config: Config, name: str, decision: PromotionDecision) -> None:
    from recsys.lineage import snapshot_hash
    from recsys.tracking import with_retries

    tags = {
        "promotion.decision": "promoted" if decision.promoted else "rejected",
        "promotion.reason": decision.reason[:TAG_VALUE_LIMIT],
        "promotion.metric": decision.metric,
        "promotion.min_improvement": str(config.promote.min_improvement),
        "promotion.champion_version": decision.champion_version or "",
        "promotion.challenger_metrics": _json_tag(decision.challenger_metrics),
        "promotion.champion_metrics": _json_tag(decision.champion_metrics),
        "promotion.popular_metrics": _json_tag(decision.popular_metrics),
        "promotion.split_snapshot": snapshot_hash(config.paths.split_dir),
        "promotion.evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    version = str(decision.challenger_version)
    for key, value in tags.items():
        with_retries(lambda k=key, v=value: store.client.set_model_version_tag(name, version, k, v), config,
                     "tagging the version", store.uri)
