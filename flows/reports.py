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
    if training.get("report_path"):
        lines[4:4] = [f"- HTML report: {file_link(training.get('report_path'))}"]
    sliced = slices_markdown(training.get("slices") or {})
    if sliced:
        lines += ["## Slices (GRU4Rec, test targets)", "", sliced]
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
    if decision.get("blocked_slices"):
        body += "\nBlocked by slices: " + ", ".join(f"`{s}`" for s in decision["blocked_slices"]) + "\n"
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


def file_link(path: str | None) -> str:
    """A markdown link to a local report file (``file://``), or a dash."""
    if not path:
        return "–"
    from pathlib import Path

    resolved = Path(path).resolve()
    return f"[{resolved.name}]({resolved.as_uri()}) (`{resolved}`)"


def slices_markdown(slices: Mapping[str, Any], model: str = "gru4rec") -> str:
    """MRR@20 per slice with its interval, one row per slice (empty string without slices)."""
    rows = (slices.get("models") or {}).get(model) or {}
    if not rows:
        return ""
    level = f"{float(slices.get('confidence', 0.95)):.0%}"
    lines = [f"| slice | targets | R@20 | MRR@20 | {level} interval |", "|---|---:|---:|---:|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row.get('n')} | {fmt(row.get('recall@20'))} | {fmt(row.get('mrr@20'))} | "
                     f"[{fmt(row.get('mrr@20_low'))}, {fmt(row.get('mrr@20_high'))}] |")
    return "\n".join(lines) + "\n"


def monitoring_markdown(manifest: Mapping[str, Any], report: str | None) -> str:
    """The export's monitoring verdict, its numbers and the findings, with a link to the HTML report."""
    mon = manifest.get("monitoring") or {}
    if not mon:
        return "# Export monitoring\n\nMonitoring is off (`score.monitoring.enabled=false`).\n"
    lines = [f"# Export monitoring {mon.get('run_date')}: **{str(mon.get('status')).upper()}**", "",
             f"- report: {file_link(report)}",
             f"- previous export: {mon.get('previous_run_date') or 'none'}", ""]
    for finding in mon.get("findings") or []:
        lines.append(f"- {finding['level']}: `{finding['metric']}` = {finding['value']:.4g} "
                     f"({finding['rule']} {finding['bound']:g})")
    lines += ["", "| number | value |", "|---|---:|"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in (mon.get("metrics") or {}).items()]
    return "\n".join(lines) + "\n"


def pipeline_summary(summary: Mapping[str, Any]) -> str:
    """The top ``pipeline`` flow run's artifact: every stage's outcome and where its reports are."""
    train = summary.get("train") or {}
    training = train.get("training") or {}
    decision = train.get("decision") or {}
    score = summary.get("score") or {}
    mon = score.get("monitoring") or {}
    ingest = summary.get("ingest") or {}
    verdict = "promoted" if decision.get("promoted") else "not promoted"
    lines = [
        f"# Pipeline {summary.get('run_date')}",
        "",
        "| stage | outcome |",
        "|---|---|",
        f"| ingest | {fmt(ingest.get('rows_in'))} rows in, {fmt(ingest.get('events_written'))} events |",
        f"| train | run `{training.get('run_id')}` → version {training.get('model_version')} |",
        f"| promote | {verdict}: {decision.get('reason', '–')} |",
        f"| score | {fmt(score.get('rows'))} rows for {fmt((score.get('counts') or {}).get('users_scored'))} "
        f"users at `{score.get('path')}` |",
        f"| monitoring | {str(mon.get('status', 'off')).upper()} "
        f"({len(mon.get('findings') or [])} finding(s)) |",
        "",
        f"- training report: {file_link(training.get('report_path'))}",
        f"- export report: {file_link(score.get('report_path'))}",
        f"- MLflow run: {train.get('run_url') or '–'}",
        "",
        "## Test metrics vs baselines",
        "",
        models_table(split_training_metrics(training.get("metrics") or {})),
    ]
    sliced = slices_markdown(training.get("slices") or {})
    if sliced:
        lines += ["## Slices (GRU4Rec)", "", sliced]
    return "\n".join(lines) + "\n"
