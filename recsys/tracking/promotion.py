"""Champion/challenger gate: evaluate both on the same holdout, move ``@champion`` only on a real gain.

The decision, the metric sets and the reason become tags of the challenger version, so the registry
says why every version serves or does not.
"""

from __future__ import annotations

import json
import logging
import math
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
    policy: dict[str, Any] = field(default_factory=dict)  # rules both sides were ranked under (+ override)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate_value(metrics: dict[str, float], metric: str) -> float:
    """``metric`` as the evaluation reports it: every metric is over all test targets (the ones a model
    could not rank count as misses), so models with different vocabularies compare fairly and the gate
    quotes the very figure the tables print."""
    return float(metrics[metric])


def _evaluate_version(
    config: Config, version: Any, label: str, with_popular: bool, rules: dict[str, Any] | None = None
) -> tuple[dict[str, dict[str, float]], dict[str, Any], str | None]:
    """Test-split metrics of one registered version (and most-popular under the same vocabulary), the
    rules of the policy it was ranked under, and the note when they are not its stored ones.

    Every version is ranked under its stored policy; ``rules`` (the challenger's, for the champion) ranks
    it under those instead, recorded in the note, so both sides of the gate answer the same question.
    """
    from recsys.device import resolve_device
    from recsys.model.checkpoint import build_model, load_checkpoint
    from recsys.model.policy import policy_for_model
    from recsys.model.recommender import GRU4RecRecommender
    from recsys.training.evaluate import evaluate_all

    resolved = resolve_model(config, f"models:/{version.name}/{version.version}")
    device = resolve_device(config.train.device)
    ckpt = load_checkpoint(resolved.checkpoint_path, map_location=device)
    policy, note = policy_for_model(ckpt.policy, config, ckpt.vocab, f"{label} v{version.version}")
    if rules is not None and policy.rules != rules:
        forced = config.model_copy(deep=True)
        forced.policy.exclude = rules["exclude"]
        forced.policy.continue_series = rules["continue_series"]
        forced.policy.override = True
        policy, note = policy_for_model(ckpt.policy, forced, ckpt.vocab, f"{label} v{version.version}")
        note = f"ranked under the challenger's policy ({note})"
    rec = GRU4RecRecommender(build_model(ckpt, device), device, name=label)
    rows = evaluate_all(config, config.paths.split_dir, {label: rec}, split="test",
                        baselines=with_popular, vocab=ckpt.vocab, device=device, policy=policy)
    for value in rows[label].values():
        if isinstance(value, float) and math.isnan(value):
            raise ValueError(f"{label} produced NaN metrics")
    return rows, policy.rules, note


def _json_tag(metrics: dict[str, float]) -> str:
    text = json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()},
                      sort_keys=True)
    return text[:TAG_VALUE_LIMIT]


def decide(metric: str, min_improvement: float, challenger: dict[str, float], popular: dict[str, float],
           champion: dict[str, float] | None, champion_version: str | None) -> tuple[bool, str]:
    """The gate: beat most-popular, and (when a champion exists) beat it by the relative margin.

    Values in the reason are the metric as every table prints it (over all test targets).
    """
    label = metric
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

    Both models are evaluated now, on the same split directory, through recsys.training.evaluate. A
    challenger that cannot be downloaded, loaded or evaluated is rejected; a champion that cannot be is
    treated as absent (the reason says so). The decision, the metric sets and the reason become tags of
    the challenger version.
    """
    from recsys.tracking.store import connect, with_retries
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
        rows, rules, note = _evaluate_version(config, challenger, CHALLENGER, with_popular=True)
        decision.challenger_metrics = rows[CHALLENGER]
        decision.popular_metrics = rows[POPULAR]
        decision.policy = {**rules, "override": note}
    except Exception as exc:  # anything wrong with the challenger's artifact keeps it out
        logger.exception("challenger version %s could not be evaluated", challenger.version)
        decision.reason = f"challenger v{challenger.version} could not be loaded or evaluated: {exc}"
        _record(store, config, name, decision)
        return decision
    champion_note = ""
    if champion is not None:
        try:
            champ_rows, _, champ_policy_note = _evaluate_version(config, champion, CHAMPION,
                                                                 with_popular=False, rules=rules)
            decision.champion_metrics = champ_rows[CHAMPION]
            if champ_policy_note:
                champion_note = f" (champion {champ_policy_note})"
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
        "promotion.policy": json.dumps(decision.policy, sort_keys=True)[:TAG_VALUE_LIMIT],
        "promotion.split_snapshot": snapshot_hash(config.paths.split_dir),
        "promotion.evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    version = str(decision.challenger_version)
    for key, value in tags.items():
        with_retries(lambda k=key, v=value: store.client.set_model_version_tag(name, version, k, v), config,
                     "tagging the version", store.uri)
