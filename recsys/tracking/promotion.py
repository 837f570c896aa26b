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
from recsys.training.significance import ALL, Interval

if TYPE_CHECKING:
    from recsys.tracking.store import TrackingStore
    from recsys.training.slices import TargetTable

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
    # challenger minus champion per target: {"overall": interval, "slices": {name: {...}}} (empty: none)
    comparison: dict[str, Any] = field(default_factory=dict)
    blocked_slices: list[str] = field(default_factory=list)  # slices whose regression kept it out
    policy: dict[str, Any] = field(default_factory=dict)  # rules both sides were ranked under (+ override)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate_value(metrics: dict[str, float], metric: str) -> float:
    """``metric`` as the evaluation reports it: every metric is over all test targets (the ones a model
    could not rank count as misses), so models with different vocabularies compare fairly and the gate
    quotes the very figure the tables print."""
    return float(metrics[metric])


@dataclass
class Evidence:
    """Per-target comparison of challenger and champion on the same test targets (paired bootstrap).

    ``overall`` and ``slices`` are intervals of (challenger - champion) of the gate metric per target;
    ``champion_slices`` the champion's own value in each slice (what a tolerance is relative to).
    """

    overall: Interval
    slices: dict[str, Interval]
    champion_slices: dict[str, float]
    challenger_slices: dict[str, float]

    def blocking(self, min_targets: int, tolerance: float, tolerances: dict[str, float]) -> list[str]:
        """Slices with ``min_targets`` or more targets that regress beyond their tolerance, for real.

        A slice blocks when the challenger's value is lower than the champion's by more than the
        tolerance (relative) AND the interval of the difference lies wholly below 0 (not noise).
        """
        blocked = []
        for name, iv in self.slices.items():
            if iv.n < min_targets or not math.isfinite(iv.high):
                continue
            allowed = tolerances.get(name, tolerance) * self.champion_slices.get(name, 0.0)
            if iv.mean < -allowed and iv.high < 0:
                blocked.append(name)
        return blocked

    def to_dict(self) -> dict[str, Any]:
        return {
            "overall": self.overall.to_dict(),
            "slices": {name: {**iv.to_dict(), "champion": self.champion_slices.get(name),
                              "challenger": self.challenger_slices.get(name)}
                       for name, iv in self.slices.items()},
        }


def build_evidence(config: Config, table: TargetTable, challenger_ranks: Any,
                   champion_ranks: Any) -> Evidence:
    """Paired bootstrap of the gate metric over ``table``'s targets, overall and per slice."""
    from recsys.training.slices import paired_comparison, per_target

    cfg = config.promote
    intervals = paired_comparison(table, challenger_ranks, champion_ranks, cfg.metric,
                                  confidence=cfg.confidence or 0.95, n_resamples=cfg.n_resamples,
                                  seed=config.evaluate.slices.seed)
    name, _, k = cfg.metric.partition("@")
    champ, chall = per_target(champion_ranks, name, int(k)), per_target(challenger_ranks, name, int(k))
    means = {s: (float(champ[m].mean()), float(chall[m].mean())) for s, m in table.slices.items() if m.any()}
    overall = intervals.pop(ALL)
    return Evidence(overall, intervals, {s: v[0] for s, v in means.items()},
                    {s: v[1] for s, v in means.items()})


def _evaluate_version(
    config: Config, version: Any, label: str, with_popular: bool, rules: dict[str, Any] | None = None,
    table: TargetTable | None = None, target_ranks: dict[str, Any] | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, Any], str | None]:
    """Test-split metrics of one registered version (and most-popular under the same vocabulary), the
    rules of the policy it was ranked under, and the note when they are not its stored ones.

    Every version is ranked under its stored policy; ``rules`` (the challenger's, for the champion) ranks
    it under those instead, recorded in the note, so both sides of the gate answer the same question.
    With ``table``, ``target_ranks[label]`` receives the version's ranks over every test target.
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
        forced.policy.continuation_slots = rules.get("continuation_slots", 0)
        forced.policy.override = True
        policy, note = policy_for_model(ckpt.policy, forced, ckpt.vocab, f"{label} v{version.version}")
        note = f"ranked under the challenger's policy ({note})"
    rec = GRU4RecRecommender(build_model(ckpt, device), device, name=label)
    ranks: dict[str, Any] | None = {} if table is not None else None
    rows = evaluate_all(config, config.paths.split_dir, {label: rec}, split="test",
                        baselines=with_popular, vocab=ckpt.vocab, device=device, policy=policy,
                        ranks=ranks)
    if table is not None and ranks is not None and target_ranks is not None:
        from recsys.training.slices import ranks_over_targets

        target_ranks[label] = ranks_over_targets(table, ckpt.vocab, ranks[label])
    for value in rows[label].values():
        if isinstance(value, float) and math.isnan(value):
            raise ValueError(f"{label} produced NaN metrics")
    return rows, policy.rules, note


def _json_tag(metrics: dict[str, float]) -> str:
    text = json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()},
                      sort_keys=True)
    return text[:TAG_VALUE_LIMIT]


def decide(metric: str, min_improvement: float, challenger: dict[str, float], popular: dict[str, float],
           champion: dict[str, float] | None, champion_version: str | None,
           evidence: Evidence | None = None, blocked: list[str] | None = None) -> tuple[bool, str]:
    """The gate: beat most-popular, and (when a champion exists) beat it by the relative margin.

    Values in the reason are the metric as every table prints it (over all test targets).
    With ``evidence`` (the paired bootstrap), the margin must be cleared by the interval's lower bound,
    not only by the point estimate, and ``blocked`` (slices regressing beyond their tolerance, from
    :meth:`Evidence.blocking`) keeps the challenger out whatever its overall gain.
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
    if evidence is not None and c > needed:
        return _decide_with_evidence(label, c, ch, p, champion_version, min_improvement, evidence,
                                     blocked or [])
    if c > needed:
        return True, (f"challenger {label}={c:.4f} beats champion v{champion_version} ({ch:.4f}) by "
                      f"{gain:+.2%} (margin {min_improvement:.2%}) and most-popular ({p:.4f})")
    if c <= ch:
        return False, (f"challenger {label}={c:.4f} is not better than champion v{champion_version} "
                       f"({ch:.4f})")
    return False, (f"challenger {label}={c:.4f} beats champion v{champion_version} ({ch:.4f}) by only "
                   f"{gain:+.2%}, below the required margin {min_improvement:.2%}")


def _decide_with_evidence(label: str, c: float, ch: float, p: float, champion_version: str | None,
                          min_improvement: float, evidence: Evidence, blocked: list[str]) -> tuple[bool, str]:
    """The point gain clears the margin: now its interval must too, and no slice may block."""
    iv = evidence.overall
    margin = ch * min_improvement
    ci = f"{iv.confidence:.0%} CI [{iv.low:+.4f}, {iv.high:+.4f}] over {iv.n:,} targets"
    head = f"challenger {label}={c:.4f} vs champion v{champion_version} ({ch:.4f}): {c - ch:+.4f}, {ci}"
    if not iv.low > margin:
        if iv.low <= 0:
            return False, f"{head}; the interval reaches 0: the gain is not significant"
        return False, (f"{head}; the gain is not significantly above the margin {min_improvement:.2%} "
                       f"(+{margin:.4f})")
    if blocked:
        parts = []
        for name in blocked:
            s = evidence.slices[name]
            parts.append(f"{name} {evidence.challenger_slices.get(name, 0.0):.4f} vs "
                         f"{evidence.champion_slices.get(name, 0.0):.4f} ({s.mean:+.4f}, "
                         f"CI [{s.low:+.4f}, {s.high:+.4f}], n={s.n:,})")
        return False, f"{head}; blocked by slices regressing beyond tolerance: " + "; ".join(parts)
    return True, (f"{head} clears the margin {min_improvement:.2%}, no slice regresses; "
                  f"beats most-popular ({p:.4f})")


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
    table, target_ranks = _target_table(config), {}  # per-target ranks for the paired bootstrap
    try:
        rows, rules, note = _evaluate_version(config, challenger, CHALLENGER, with_popular=True, table=table,
                                              target_ranks=target_ranks)
        decision.challenger_metrics = rows[CHALLENGER]
        decision.popular_metrics = rows[POPULAR]
        decision.policy = {**rules, "override": note}
    except Exception as exc:  # anything wrong with the challenger's artifact keeps it out
        logger.exception("challenger version %s could not be evaluated", challenger.version)
        decision.reason = f"challenger v{challenger.version} could not be loaded or evaluated: {exc}"
        _record(store, config, name, decision)
        return decision
    for _ in range(CAS_ROUNDS):
        _judge(config, decision, champion, table, target_ranks, rules)
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


def _judge(config: Config, decision: PromotionDecision, champion: Any | None, table: TargetTable | None,
           target_ranks: dict[str, Any], rules: dict[str, Any]) -> None:
    """Fill ``decision`` (champion version and metrics, verdict, reason) against ``champion``, which is
    ranked under the challenger's policy ``rules`` so both sides answer the same question."""
    decision.champion_version = _version_str(champion)
    decision.champion_metrics = {}
    decision.comparison, decision.blocked_slices = {}, []
    target_ranks.pop(CHAMPION, None)
    champion_note = ""
    if champion is not None:
        try:
            champ_rows, _, policy_note = _evaluate_version(
                config, champion, CHAMPION, with_popular=False, rules=rules, table=table,
                target_ranks=target_ranks)
            decision.champion_metrics = champ_rows[CHAMPION]
            if policy_note:
                champion_note = f" (champion {policy_note})"
        except Exception as exc:
            logger.exception("champion version %s could not be evaluated", champion.version)
            champion_note = (f" (champion v{champion.version} could not be evaluated: {exc}; "
                             "treated as absent)")
    evidence = None
    if table is not None and decision.champion_metrics and {CHALLENGER, CHAMPION} <= set(target_ranks):
        evidence = build_evidence(config, table, target_ranks[CHALLENGER], target_ranks[CHAMPION])
        cfg = config.promote
        decision.blocked_slices = evidence.blocking(cfg.min_slice_targets, cfg.slice_tolerance,
                                                    cfg.slice_tolerances)
        decision.comparison = evidence.to_dict()
    decision.promoted, decision.reason = decide(
        config.promote.metric, config.promote.min_improvement, decision.challenger_metrics,
        decision.popular_metrics, decision.champion_metrics or None, decision.champion_version,
        evidence, decision.blocked_slices,
    )
    decision.reason += champion_note


def _target_table(config: Config) -> TargetTable | None:
    """The test targets with their slices, when the gate compares per target (``promote.confidence``)."""
    if config.promote.confidence is None:
        return None
    from recsys.schemas import TEST_FILE
    from recsys.training.slices import target_table

    return target_table(config, config.paths.split_dir, TEST_FILE)


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
    if decision.comparison:
        overall = decision.comparison["overall"]
        tags["promotion.interval"] = (f"{overall['mean']:+.6f} [{overall['low']:+.6f}, "
                                      f"{overall['high']:+.6f}] @{overall['confidence']}")
        tags["promotion.blocked_slices"] = ",".join(decision.blocked_slices)
    version = str(decision.challenger_version)
    for key, value in tags.items():
        with_retries(lambda k=key, v=value: store.client.set_model_version_tag(name, version, k, v), config,
                     "tagging the version", store.uri)
