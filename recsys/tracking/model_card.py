"""Model cards: what a registered version is, what it was trained on, how good it is and where it is not.

One card per registered version, as JSON (for tools) and Markdown (the registry version's description
and a run artifact), built from the training summary and the split's ``stats.json``: data window and
table versions, evaluation protocol and recommendation policy, test metrics with intervals, slices,
baselines, training cost, known limitations and lineage.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from recsys.config import Config

CARD_METRICS = ("recall@20", "mrr@20", "ndcg@20", "coverage@20", "popularity@20")
DESCRIPTION_LIMIT = 4900  # MLflow keeps at most 5000 characters of a version description


def events_table_version(events_dir: Path) -> int | None:
    """The latest Delta Lake version of the events table (None for a plain Parquet directory)."""
    log_dir = Path(events_dir) / "_delta_log"
    versions = [int(p.stem) for p in log_dir.glob("*.json") if p.stem.isdigit()] if log_dir.is_dir() else []
    return max(versions) if versions else None


def _limitations(stats: Mapping[str, Any], slices: Mapping[str, Any], test: Mapping[str, Any]) -> list[str]:
    """Plain statements a reader should know before trusting the numbers, derived from the data."""
    notes = []
    test_split = (stats.get("splits") or {}).get("test") or {}
    unseen = test_split.get("unseen_targets")
    if unseen:
        notes.append(f"{unseen:,} test targets are items unseen in training: the model cannot recommend new "
                     "items until it is retrained (they count as misses).")
    gru = (slices.get("models") or {}).get("gru4rec") or {}
    overall = (gru.get("all") or {}).get("mrr@20")
    for name, row in gru.items():
        value, n = row.get("mrr@20"), row.get("n", 0)
        if name in ("all", "item:new") or overall is None or value is None or n < 50:
            continue
        if not math.isfinite(value):
            continue
        if value < 0.5 * overall:
            notes.append(f"weak on slice {name}: MRR@20 {value:.4f} vs {overall:.4f} overall "
                         f"({n:,} targets).")
    if test.get("coverage@20") is not None and float(test["coverage@20"]) < 0.2:
        notes.append(f"recommendations cover {float(test['coverage@20']):.1%} of the catalogue at K=20 "
                     "(popularity concentration).")
    notes.append("offline evaluation on a temporal holdout; online effects (position bias, feedback loops) "
                 "are not measured.")
    return notes


def build_card(
    config: Config,
    *,
    name: str,
    version: str,
    run_id: str,
    split_dir: Path,
    summary: Mapping[str, Any],
    lineage: Mapping[str, str],
) -> dict[str, Any]:
    """The card as plain data. ``summary`` is tracked training's result (metrics, slices, history...)."""
    from recsys.tracking.lineage import read_split_stats, snapshot_hash

    stats = read_split_stats(split_dir)
    slices = summary.get("slices") or {}
    history = summary.get("history") or []
    test = summary.get("test_metrics") or {}
    gru_slices = (slices.get("models") or {}).get("gru4rec") or {}
    every = gru_slices.get("all") or {}  # over every test target, the unrankable ones as misses
    intervals = {k: {"all_targets": every.get(k), "low": every.get(f"{k}_low"),
                     "high": every.get(f"{k}_high")}
                 for k in ("recall@20", "mrr@20", "ndcg@20") if every}
    return {
        "model": {"name": name, "version": version, "run_id": run_id, "architecture": "GRU4Rec",
                  "loss": config.train.loss, "hidden_size": config.model.hidden_size,
                  "layers": config.model.n_layers, "embedding": config.model.embedding,
                  "n_items": summary.get("n_items")},
        "data": {
            "window": {"from": stats.get("time_min"), "to": stats.get("time_max"),
                       "valid_cutoff": stats.get("valid_cutoff"), "test_cutoff": stats.get("test_cutoff")},
            "events_dir": str(config.paths.events_dir),
            "events_table_version": events_table_version(config.paths.events_dir),
            "split_snapshot": snapshot_hash(split_dir),
            "splits": {k: {"sequences": v.get("sequences"), "events": v.get("events"),
                           "users": v.get("users")} for k, v in (stats.get("splits") or {}).items()},
        },
        "protocol": {"split": stats.get("protocol", config.split.protocol),
                     "sessions": config.sessions.mode, "ranking": "full catalogue, ties counted against",
                     "cutoffs": list(config.evaluate.cutoffs)},
        "policy": {"described": summary.get("policy"), "top_k": config.score.top_k},
        "metrics": {"test": {k: test.get(k) for k in CARD_METRICS if k in test},
                    "intervals": intervals, "confidence": slices.get("confidence")},
        "baselines": {name: {k: m.get(k) for k in CARD_METRICS if k in m}
                      for name, m in (summary.get("baseline_metrics") or {}).items()},
        "slices": {s: {"n": row.get("n"), "recall@20": row.get("recall@20"), "mrr@20": row.get("mrr@20"),
                       "mrr@20_ci": [row.get("mrr@20_low"), row.get("mrr@20_high")]}
                   for s, row in gru_slices.items()},
        "training_cost": {
            "epochs": len(history), "best_epoch": summary.get("best_epoch"),
            "train_seconds": round(sum(float(e.get("epoch_seconds", 0.0)) for e in history), 1),
            "events_per_second": round(float(history[-1].get("events_per_second", 0.0))) if history else None,
            "device": summary.get("device"),
            "refit_epochs": (summary.get("metrics") or {}).get("refit_epochs"),
        },
        "limitations": _limitations(stats, slices, test),
        "lineage": dict(lineage),
    }


def _num(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def card_markdown(card: Mapping[str, Any]) -> str:
    """The card as Markdown, short enough for a registry description (slices trimmed if needed)."""
    m, d, metrics = card["model"], card["data"], card["metrics"]
    window = d["window"]
    lines = [
        f"# Model card: {m['name']} v{m['version']}",
        "",
        f"{m['architecture']} ({m['loss']}, hidden {m['hidden_size']}, {m['layers']} layer(s), "
        f"{m['embedding']} embedding, {m.get('n_items')} items) from run `{m['run_id']}`.",
        "",
        "## Data",
        f"- window {window.get('from')} → {window.get('to')}; test from {window.get('test_cutoff')}",
        f"- events table version: {d.get('events_table_version')}; "
        f"split snapshot `{d['split_snapshot'][:16]}`",
        "",
        "## Protocol and policy",
        f"- {card['protocol']['split']} split, {card['protocol']['sessions']} sequences, "
        f"{card['protocol']['ranking']}",
        f"- recommendation policy (training, evaluation, gate, scoring and serving alike): "
        f"{card['policy'].get('described')}; top {card['policy']['top_k']}",
        "",
        "## Test metrics (with intervals) and baselines",
        "| model | R@20 | MRR@20 | NDCG@20 | coverage@20 |",
        "|---|---:|---:|---:|---:|",
    ]
    ci = metrics.get("intervals", {}).get("mrr@20") or {}
    t = metrics["test"]
    lines.append(f"| GRU4Rec | {_num(t.get('recall@20'))} | {_num(t.get('mrr@20'))} | "
                 f"{_num(t.get('ndcg@20'))} | {_num(t.get('coverage@20'))} |")
    for name, b in card["baselines"].items():
        lines.append(f"| {name} | {_num(b.get('recall@20'))} | {_num(b.get('mrr@20'))} | "
                     f"{_num(b.get('ndcg@20'))} | {_num(b.get('coverage@20'))} |")
    if ci:
        lines += ["", f"Over every test target (unrankable ones as misses) GRU4Rec's MRR@20 is "
                  f"{_num(ci.get('all_targets'))}, {_num(metrics.get('confidence'))} interval "
                  f"[{_num(ci.get('low'))}, {_num(ci.get('high'))}]."]
    lines += ["", "## Slices (MRR@20 with interval)", "| slice | targets | MRR@20 | interval |",
              "|---|---:|---:|---|"]
    for name, row in card["slices"].items():
        lo, hi = row["mrr@20_ci"]
        lines.append(f"| {name} | {row['n']} | {_num(row['mrr@20'])} | [{_num(lo)}, {_num(hi)}] |")
    cost = card["training_cost"]
    lines += ["", "## Training cost",
              f"- {cost['epochs']} epochs (best {cost['best_epoch']}), {cost['train_seconds']} s on "
              f"{cost['device']}, {cost['events_per_second']} events/s",
              "", "## Known limitations", *[f"- {n}" for n in card["limitations"]],
              "", "## Lineage",
              *[f"- {k}: {v}" for k, v in card["lineage"].items()
                if k.startswith(("code.", "data.events", "seed"))]]
    return "\n".join(lines) + "\n"


def description(card: Mapping[str, Any]) -> str:
    """The Markdown card cut to the registry's description limit (the artifact keeps the whole card)."""
    text = card_markdown(card)
    if len(text) <= DESCRIPTION_LIMIT:
        return text
    return text[: DESCRIPTION_LIMIT - 60].rsplit("\n", 1)[0] + "\n\n(cut: the full card is a run artifact)\n"


def card_json(card: Mapping[str, Any]) -> str:
    return json.dumps(card, indent=2, default=str)
