"""A real `mlflow server` stopped after the first epoch and started again while training goes on (issue 14
#5): training never waits, the epochs it could not log are sent once the server answers again, and the
run ends FINISHED with its model registered, instead of losing every later epoch and staying RUNNING."""

from __future__ import annotations

import sys
import threading
import time

import pytest
from servers import BIN, ROOT, free_port, start, stop, wait_healthy

sys.path.insert(0, str(ROOT / "tests" / "unit"))  # the tiny training world of the unit tests

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def test_training_survives_a_server_restart(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from mlflow_fixtures import make_world

    import recsys.tracking.runs as runs

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(BIN / "mlflow"), "server", "--host=127.0.0.1", f"--port={port}", "--workers=1",
               f"--backend-store-uri=sqlite:///{tmp_path / 'mlflow.db'}", "--serve-artifacts",
               f"--artifacts-destination={tmp_path / 'mlartifacts'}"]
    env = {"PATH": str(BIN), "HOME": str(tmp_path), "MLFLOW_DISABLE_TELEMETRY": "true"}
    servers = [start(command, env, tmp_path / "server-1.log")]
    wait_healthy(f"{url}/health", servers[0], 240, tmp_path / "server-1.log")
    restarted: dict[str, float] = {}

    def restart() -> None:
        stop(servers[0])
        restarted["down"] = time.monotonic()
        servers.append(start(command, env, tmp_path / "server-2.log"))
        restarted["up"] = restarted["down"] + wait_healthy(f"{url}/health", servers[1], 240,
                                                           tmp_path / "server-2.log")

    log_epoch = runs.EpochLogger.__call__
    restarter = threading.Thread(target=restart)

    def restart_after_first_epoch(self, info):
        log_epoch(self, info)
        if info["epoch"] == 1:
            restarter.start()
            while "down" not in restarted:  # the server is gone before epoch 2 ends
                time.sleep(0.1)

    monkeypatch.setattr(runs.EpochLogger, "__call__", restart_after_first_epoch)
    from recsys.config import TrackingConfig

    default = TrackingConfig()
    assert default.retry_window_seconds >= 120  # the default covers a restart: it is what runs here
    config = make_world(tmp_path / "data", train={"epochs": 5, "patience": 10},
                        tracking={"tracking_uri": url, "system_metrics": False,
                                  "retry_window_seconds": default.retry_window_seconds,
                                  "retry_backoff_seconds": default.retry_backoff_seconds})
    try:
        t0 = time.monotonic()
        out = runs.tracked_training(config)
        finished = time.monotonic()
        restarter.join()
        client = MlflowClient(tracking_uri=url)
        assert [m.step for m in client.get_metric_history(out["run_id"], "valid_mrr_20")] == [1, 2, 3, 4, 5]
        assert client.get_run(out["run_id"]).info.status == "FINISHED"
        challenger = client.get_model_version_by_alias(config.tracking.registered_model, "challenger")
        assert str(challenger.version) == out["model_version"]
        assert finished >= restarted["up"]  # it outlasted the outage instead of giving up
        print(f"server down {restarted['up'] - restarted['down']:.0f} s; training + logging "
              f"{finished - t0:.0f} s")
    finally:
        for server in servers:
            stop(server)
