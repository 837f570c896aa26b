"""flows/prefect.yaml: every entrypoint imports to a flow, every schedule parses and matches conf/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml
from prefect import Flow
from prefect.client.schemas.schedules import CronSchedule

from recsys.config import load_config

ROOT = Path(__file__).resolve().parents[2]
SPEC = yaml.safe_load((ROOT / "flows" / "prefect.yaml").read_text())


def load_entrypoint(entrypoint: str) -> object:
    path, _, name = entrypoint.partition(":")
    module_name = path.removesuffix(".py").replace("/", ".")
    module = importlib.import_module(module_name)
    assert (ROOT / path).is_file()
    return getattr(module, name)


def test_every_entrypoint_is_a_flow():
    for deployment in SPEC["deployments"]:
        assert isinstance(load_entrypoint(deployment["entrypoint"]), Flow), deployment["name"]


def test_every_schedule_parses_and_matches_the_config():
    orch = load_config(ROOT / "conf").orchestrate
    expected = {"ingest-daily": orch.ingest_cron, "score-daily": orch.score_cron,
                "train-weekly": orch.train_cron, "update-daily": orch.update_cron}
    seen = {}
    for deployment in SPEC["deployments"]:
        for schedule in deployment.get("schedules") or []:
            parsed = CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))
            assert parsed.timezone == orch.timezone
            seen[deployment["name"]] = parsed.cron
    assert seen == expected


def test_work_pools_and_training_concurrency():
    pools = {d["name"]: d["work_pool"]["name"] for d in SPEC["deployments"]}
    assert pools["train-weekly"] == "gpu"
    assert {pools[n] for n in ("ingest-daily", "score-daily", "pipeline")} == {"cpu"}
    train = next(d for d in SPEC["deployments"] if d["name"] == "train-weekly")
    assert train["concurrency_limit"]["limit"] == load_config(ROOT / "conf").orchestrate.train_concurrency


def test_parameters_match_the_flow_signatures():
    for deployment in SPEC["deployments"]:
        fn = load_entrypoint(deployment["entrypoint"])
        assert set(deployment.get("parameters") or {}) <= set(fn.parameters.properties), deployment["name"]
