"""Promote flow: one registered version (default @challenger) against the champion -> moves @champion."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows._common import as_plain, data_root_slot, flow_config, forward_library_logs, io_task
from flows.reports import promotion_report
from recsys.config import Config

forward_library_logs()

PROMOTION_KEY = "promotion-decision"


@task(name="promote-challenger", cache_policy=NO_CACHE)
def promote_task(config: Config, version: str | None = None) -> dict[str, Any]:
    """Compare `version` (default @challenger) with @champion and most-popular; move the alias on a pass."""
    from recsys.tracking.promotion import promote

    return as_plain(promote(config, version=version))


@flow(name="promote")
def promote_flow(version: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Champion/challenger gate.

    Evaluates registered model `version` (a training passes the version it registered; empty means the
    version behind @challenger) and @champion on the same temporal holdout and moves @champion to it when
    it beats the champion's `promote.metric` by at least `promote.min_improvement` (compare-and-set: never
    over a decision made meanwhile). Re-running leaves @champion where it is.
    """
    logger = get_run_logger()
    config = flow_config(overrides)
    with data_root_slot(config, f"promotion of {version or '@challenger'}"):
        decision = io_task(promote_task, config)(config, version)
    create_markdown_artifact(markdown=promotion_report(decision), key=PROMOTION_KEY,
                             description="Challenger vs champion and the promotion decision")
    logger.info("promotion: %s (%s)", "promoted" if decision.get("promoted") else "kept champion",
                decision.get("reason"))
    return decision
