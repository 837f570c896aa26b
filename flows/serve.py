"""Serve the scheduled deployments from one long-running process (`recsys serve`, `python -m flows.serve`).

For a single box: no work pool or worker needed, the runner executes the runs itself. For production
with work pools (CPU for ingest/score, GPU for training) use `flows/prefect.yaml` instead.
"""

from __future__ import annotations

import argparse
from typing import Any

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from flows._common import flow_config
from flows.ingest import ingest_flow
from flows.pipeline import pipeline_flow
from flows.promote import promote_flow
from flows.score import score_flow
from flows.train import train_flow
from flows.update import update_flow
from recsys.config import Config


def build_deployments(config: Config, overrides: list[str] | None = None) -> list[RunnerDeployment]:
    """The deployments with the cron schedules of `conf/orchestrate.yaml` (same names as prefect.yaml)."""
    orch = config.orchestrate
    params: dict[str, Any] = {"overrides": list(overrides)} if overrides else {}
    return [
        ingest_flow.to_deployment(
            name="ingest-daily", schedules=[Cron(orch.ingest_cron, timezone=orch.timezone)],
            parameters=params, tags=["recsys", "daily"],
        ),
        # daily: ingest (02:00) -> update + promote (03:00, not on the training day) -> score (04:00)
        update_flow.to_deployment(
            name="update-daily", schedules=[Cron(orch.update_cron, timezone=orch.timezone)],
            parameters={**params, "promote": True}, tags=["recsys", "daily"],
            concurrency_limit=ConcurrencyLimitConfig(
                limit=orch.train_concurrency, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
            ),
        ),
        score_flow.to_deployment(
            name="score-daily", schedules=[Cron(orch.score_cron, timezone=orch.timezone)],
            parameters=params, tags=["recsys", "daily"],
        ),
        train_flow.to_deployment(
            name="train-weekly", schedules=[Cron(orch.train_cron, timezone=orch.timezone)],
            parameters={**params, "promote": True}, tags=["recsys", "weekly"],
            # One training at a time: later runs wait for the slot instead of competing for the device.
            concurrency_limit=ConcurrencyLimitConfig(
                limit=orch.train_concurrency, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
            ),
        ),
        promote_flow.to_deployment(name="promote", parameters=params, tags=["recsys"]),
        pipeline_flow.to_deployment(name="pipeline", parameters=params, tags=["recsys"]),
    ]


def main(argv: list[str] | None = None) -> None:
    """Register the deployments and run them on schedule until interrupted (schedules stay active)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override section.key=value (repeatable); also passed to every run")
    parser.add_argument("--limit", type=int, default=None, help="max concurrent runs in this process")
    args = parser.parse_args(argv)
    config = flow_config(args.overrides)
    serve(*build_deployments(config, args.overrides), pause_on_shutdown=False, limit=args.limit)


if __name__ == "__main__":
    main()
