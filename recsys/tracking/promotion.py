"""Champion/challenger gate: evaluate both on the same holdout, move ``@champion`` only on a real gain.

The decision, the metric sets and the reason become tags of the challenger version, so the registry
says why every version serves or does not.

Which version is judged: the one the caller names (a training passes the version it registered), so two
trainings at once each get a decision about their own model; only a bare ``recsys promote`` falls back to
whatever ``@challenger`` points at. How ``@champion`` moves: compare-and-set. Just before moving it the
current champion is read again; if another decision moved it meanwhile, the challenger is judged again
against that newer champion instead of overwriting it. On the embedded store a file lock makes the
check-and-move atomic between processes; against a server the flows serialise promotions (one training
slot per data root, flows/_common.py), and the re-check covers anything else.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from recsys.config import Config
from recsys.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    TAG_VALUE_LIMIT,
    RegistryError,
    get_version,
    resolve_model,
)

if TYPE_CHECKING:
    from recsys.tracking.store import TrackingStore

logger = logging.getLogger(__name__)

POPULAR = "most-popular"
CAS_ROUNDS = 5  # champions that may move under one promotion before it gives up (each is judged)


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


def gate_value(metrics: dict[str, float], metric: str) -> float:
    """``metric`` over every test target: targets a model could not rank (items outside its vocabulary,
    no known history) count as misses, so models with different vocabularies are compared fairly."""
    from recsys.training.evaluate import LOST_TARGET_KEYS

    value = float(metrics[metric])
    n = float(metrics.get("n_queries", 0))
    lost = sum(float(metrics.get(k, 0)) for k in LOST_TARGET_KEYS)
    return value * n / (n + lost) if n + lost > 0 else 0.0


def _evaluate_version(
    config: Config, version: Any, label: str, with_popular: bool
) -> dict[str, dict[str, float]]:
    """Test-split metrics of one registered version (and most-popular under the same vocabulary)."""
    from recsys.device import resolve_device
    from recsys.model.checkpoint import build_model, load_checkpoint
    from recsys.model.recommender import GRU4RecRecommender
    from recsys.training.evaluate import evaluate_all

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


@contextlib.contextmanager
def _alias_lock(config: Config, store: TrackingStore) -> Iterator[None]:
    """Exclusive between processes on the embedded store (its database lives on this file system)."""
    if not store.embedded:
        yield
        return
    config.paths.mlflow_dir.mkdir(parents=True, exist_ok=True)
    with (config.paths.mlflow_dir / ".champion.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _current_champion(store: TrackingStore, config: Config, name: str) -> Any | None:
    try:
        return get_version(store, config, name, "@" + CHAMPION)
    except RegistryError:
        return None


def _version_str(version: Any | None) -> str | None:
    return str(version.version) if version is not None else None


def promote(config: Config, version: str | int | None = None) -> PromotionDecision:
    """Judge registered ``version`` (default: ``@challenger``) against ``@champion`` and most-popular on
    the test split; move ``@champion`` to it when the gate passes (compare-and-set, see the module doc).

    Both models are evaluated now, on the same split directory, through recsys.training.evaluate. A
    challenger that cannot be downloaded, loaded or evaluated is rejected; a champion that cannot be is
    treated as absent (the reason says so). The decision, the metric sets and the reason become tags of
    the judged version.
    """
    from recsys.tracking.store import connect, with_retries
    metric = config.promote.metric
    cutoff = metric.partition("@")[2]
    if not cutoff.isdigit() or int(cutoff) not in config.evaluate.cutoffs:
        raise ValueError(f"promote.metric={metric!r} must be <metric>@K with K in evaluate.cutoffs "
                         f"{config.evaluate.cutoffs}")
    store = connect(config)
    name = config.tracking.registered_model
    challenger = get_version(store, config, name, str(version) if version is not None else "@" + CHALLENGER)
    champion = _current_champion(store, config, name)
    decision = PromotionDecision(False, "", metric, str(challenger.version), _version_str(champion))
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
    for _ in range(CAS_ROUNDS):
        _judge(config, decision, champion)
        if not decision.promoted:
            break
        with _alias_lock(config, store):
            current = with_retries(lambda: _current_champion(store, config, name), config,
                                   "re-reading the champion", store.uri)
            if _version_str(current) == decision.champion_version:
                with_retries(lambda: store.client.set_registered_model_alias(
                    name, CHAMPION, str(challenger.version)), config, "moving the champion alias", store.uri)
                break
        logger.info("@champion moved from v%s to v%s during this promotion: judging v%s against it",
                    decision.champion_version, _version_str(current), challenger.version)
        champion = current
        if champion is not None and str(champion.version) == str(challenger.version):
            decision.promoted = False
            decision.reason = f"version {challenger.version} is already the champion"
            return decision
    else:  # the champion kept moving: decide nothing rather than overwrite a newer decision
        decision.promoted = False
        decision.reason = f"@champion kept moving during the promotion ({CAS_ROUNDS} times): not moved"
    replaced = decision.champion_version
    if decision.promoted and replaced is not None:
        with_retries(lambda: store.client.set_model_version_tag(
            name, replaced, "promotion.replaced_by", str(challenger.version)),
            config, "tagging the replaced champion", store.uri)
    _record(store, config, name, decision)
    logger.info("promotion of %s v%s: %s — %s", name, challenger.version,
                "PROMOTED" if decision.promoted else "kept out", decision.reason)
    return decision


def _judge(config: Config, decision: PromotionDecision, champion: Any | None) -> None:
    """Fill ``decision`` (champion version and metrics, verdict, reason) against ``champion``."""
    decision.champion_version = _version_str(champion)
    decision.champion_metrics = {}
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
        config.promote.metric, config.promote.min_improvement, decision.challenger_metrics,
        decision.popular_metrics, decision.champion_metrics or None, decision.champion_version,
    )
    decision.reason += champion_note


def _record(store: TrackingStore, config: Config, name: str, decision: PromotionDecision) -> None:
    from recsys.tracking.lineage import snapshot_hash
    from recsys.tracking.store import with_retries

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
