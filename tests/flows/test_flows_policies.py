"""Retry policy of I/O tasks, config errors, and the served deployments."""

from __future__ import annotations

import pytest
from prefect import flow, task

from flows._common import io_task, retry_io_errors
from recsys.config import ConfigError, load_config

pytestmark = pytest.mark.timeout(120)

CONFIG = load_config(None, ["orchestrate.io_retries=2", "orchestrate.io_retry_delay_seconds=0"])


def make_counting_task(error: BaseException):
    calls = {"n": 0}

    @task
    def flaky() -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            raise error
        return calls["n"]

    return flaky, calls


def test_io_task_retries_transient_errors(harness):
    flaky, calls = make_counting_task(OSError("disk hiccup"))

    @flow
    def f() -> int:
        return io_task(flaky, CONFIG)()

    assert f() == 2 and calls["n"] == 2


@pytest.mark.parametrize("error", [ConfigError("bad key"), MemoryError(), ValueError("bad data")])
def test_io_task_never_retries_deterministic_errors(harness, error):
    flaky, calls = make_counting_task(error)

    @flow
    def f() -> int:
        return io_task(flaky, CONFIG)()

    with pytest.raises(type(error)):
        f()
    assert calls["n"] == 1


def test_training_has_no_retries_io_tasks_back_off_exponentially():
    from flows.ingest import ingest_task
    from flows.train import train_task

    assert train_task.retries == 0
    config = load_config(None, ["orchestrate.io_retries=3", "orchestrate.io_retry_delay_seconds=2"])
    io = io_task(ingest_task, config)
    assert io.retries == 3 and io.retry_condition_fn is retry_io_errors
    assert io.retry_delay_seconds == [2.0, 4.0, 8.0]


def test_bad_override_fails_the_flow_before_any_task(harness):
    from flows.ingest import ingest_flow

    with pytest.raises(ConfigError, match="ingest.nope"):
        ingest_flow(overrides=["ingest.nope=1"])


def test_served_deployments_carry_the_config_schedules():
    from flows.serve import build_deployments

    config = load_config(None, ["orchestrate.train_concurrency=2"])
    deployments = {d.name: d for d in build_deployments(config, ["train.epochs=2"])}
    assert set(deployments) == {"ingest-daily", "update-daily", "score-daily", "train-weekly", "promote",
                                "pipeline"}
    crons = {name: [s.schedule.cron for s in d.schedules] for name, d in deployments.items()}
    assert crons["ingest-daily"] == [config.orchestrate.ingest_cron]
    assert crons["score-daily"] == [config.orchestrate.score_cron]
    assert crons["train-weekly"] == [config.orchestrate.train_cron]
    assert crons["update-daily"] == [config.orchestrate.update_cron]
    assert deployments["train-weekly"].concurrency_limit == 2
    assert deployments["train-weekly"].parameters["overrides"] == ["train.epochs=2"]
