"""Markdown and table bodies of the flows' Prefect artifacts, built from the library's small result dicts.

Pure functions (no Prefect, no I/O) so that tests can check the content without running a flow.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from flows._common import fmt

# Columns shown in metric tables, in this order, when present.
METRIC_COLUMNS = ("recall@10", "recall@20", "mrr@10", "mrr@20", "ndcg@20", "coverage@20", "popularity@20")


def models_table(models: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table, one row per model (``{name: {metric: value}}``), the usual metric columns."""
    columns = [c for c in METRIC_COLUMNS if any(c in m for m in models.values())]
    if not columns:  # unknown metric names: show whatever numeric keys the first model has
        first = next(iter(models.values()), {})
        columns = [k for k, v in first.items() if isinstance(v, int | float)][:8]
    head = "| model | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns) + "\n"
    body = "".join(
        f"| {name} | " + " | ".join(fmt(metrics.get(c)) for c in columns) + " |\n"
        for name, metrics in models.items()
    )
    counted = next((m for m in models.values() if "n_queries" in m), None)
    if counted is not None:  # how every target was counted (the metrics are over all of them)
        from recsys.training.evaluate import target_line

        body += f"\n{target_line(counted)} (metrics over all targets)\n"
    return head + body


_METRIC_SUFFIX = re.compile(r"_((?:recall|mrr|ndcg|coverage|popularity|hitrate)_\d+)$")


def split_training_metrics(metrics: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``tracked_training``'s flat metrics -> ``{model: {"mrr@20": ...}}``.

    Keys look like ``test_gru_mrr_20`` / ``test_most_popular_recall_20`` (``recsys.tracking.final_metrics``);
    the GRU comes first, each baseline after it.
    """
    models: dict[str, dict[str, Any]] = {}
    for key, value in metrics.items():
        match = _METRIC_SUFFIX.search(key)
        if not key.startswith("test_") or match is None:
            continue
        model = key[len("test_"): match.start()]
        name, _, k = match.group(1).rpartition("_")
        models.setdefault(model, {})[f"{name}@{k}"] = value
    if "gru" in models:
        models = {"gru4rec": models.pop("gru"), **models}
    return models


def training_report(
    run_date: str,
    training: Mapping[str, Any],
    decision: Mapping[str, Any] | None,
    run_url: str | None,
) -> str:
    """The training-report markdown: metrics vs baselines, vs the champion, and the promotion decision."""
    lines = [
        f"# Training report — {run_date}",
        "",
        f"- MLflow run: `{training.get('run_id')}`" + (f" ([open]({run_url}))" if run_url else ""),
        f"- registered model version: `{training.get('model_version')}`",
        "",
        "## Test metrics vs baselines (same holdout)",
        "",
        models_table(split_training_metrics(training.get("metrics") or {})),
    ]
    if decision is None:
        lines += ["## Promotion", "", "Not run (`promote=False`)."]
        return "\n".join(lines) + "\n"
    compared = decision_models(decision)
    verdict = "**promoted to @champion**" if decision.get("promoted") else "**not promoted**"
    lines += ["## Challenger vs champion", ""]
    lines += [models_table(compared)] if compared else ["No metrics were compared."]
    lines += ["## Promotion decision", "", f"{verdict} — {decision.get('reason', '')}"]
    return "\n".join(lines) + "\n"


def decision_models(decision: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{label: metrics}`` of a PromotionDecision: challenger, champion (if any), most-popular."""
    rows = {
        f"challenger v{decision.get('challenger_version')}": decision.get("challenger_metrics"),
        f"champion v{decision.get('champion_version')}": decision.get("champion_metrics"),
        "most popular": decision.get("popular_metrics"),
    }
    return {name: dict(m) for name, m in rows.items() if m}


def promotion_report(decision: Mapping[str, Any]) -> str:
    """Markdown of a promotion decision on its own (promote flow)."""
    verdict = "promoted to @champion" if decision.get("promoted") else "not promoted"
    compared = decision_models(decision)
    body = models_table(compared) if compared else ""
    return f"# Promotion decision: {verdict}\n\n{decision.get('reason', '')}\n\n{body}"


def export_summary_table(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows of the export-summary artifact from the export's ``_manifest.json`` content."""
    rows: list[dict[str, Any]] = []

    def add(name: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, inner in value.items():
                add(f"{name}.{key}", inner)
        elif not isinstance(value, list):
            rows.append({"field": name, "value": fmt(value)})

    for key in ("run_date", "path", "rows", "model", "counts", "shards", "top_k", "device"):
        if key in manifest:
            add(key, manifest[key])
    snapshot = (manifest.get("input") or {}).get("snapshot_hash")
    if snapshot:
        add("input.snapshot_hash", snapshot)
    return rows
