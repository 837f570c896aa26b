"""Promote flow: the latest challenger against the champion on the same holdout -> moves @champion."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows._common import as_plain, flow_config, forward_library_logs, io_task
from flows.reports import promotion_report
from recsys.config import Config

forward_library_logs()

PROMOTION_KEY = "promotion-decision"


@task(name="promote-challenger", cache_policy=NO_CACHE)
def promote_task(config: Config) -> dict[str, Any]:
    """Compare @challenger with @champion (and most-popular); move the alias when the gate passes."""
    from recsys.tracking.promotion import promote

    return as_plain(promote(config))


@flow(name="promote")
def promote_flow(overrides: list[str] | None = None) -> dict[str, Any]:
    """Champion/challenger gate.

    Evaluates the registered model's @challenger and @champion versions on the same temporal holdout
    and moves @champion to the challenger when it beats the champion's `promote.metric` by at least
    `promote.min_improvement`. Re-running without a new challenger leaves @champion where it is.
    """
    logger = get_run_logger()
    config = flow_config(overrides)
    decision = io_task(promote_task, config)(config)
    create_markdown_artifact(markdown=promotion_report(decision), key=PROMOTION_KEY,
                             description="Challenger vs champion and the promotion decision")
    logger.info("promotion: %s (%s)", "promoted" if decision.get("promoted") else "kept champion",
                decision.get("reason"))
    return decision
