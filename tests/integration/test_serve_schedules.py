"""`recsys serve` with no PREFECT_API_URL on one box: its schedules fire (issue 14 #1).

Prefect's temporary API server never runs the scheduler, so served deployments registered their crons
and no run was ever created. `recsys serve` now starts a real local Prefect server: with an every-minute
ingest schedule, the scheduler creates a run and the serving process executes it to completion. On
SIGTERM both stop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from servers import ROOT, free_port, stop

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def post(url: str, body: dict) -> list[dict]:
    request = urllib.request.Request(url, method="POST", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_serve_starts_a_server_whose_scheduler_runs_the_deployments(tmp_path):
    data, port = tmp_path / "data", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update({"PYTHONPATH": str(ROOT), "PREFECT_RUNNER_POLL_FREQUENCY": "2",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true"})
    overrides = [f"paths.data_root={data}", "generate.n_events=2000"]
    sets = [a for o in overrides for a in ("--set", o)]
    subprocess.run([sys.executable, "-m", "recsys.cli", "generate", *sets], env=env, check=True,
                   capture_output=True, timeout=300)
    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", *sets, "--set", "orchestrate.ingest_cron='* * * * *'",
         "--set", f"orchestrate.server_port={port}"],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline, completed = time.monotonic() + 420, []
        while not completed:
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-4000:]
            time.sleep(3)
            try:
                done = {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
                runs = post(f"{api}/flow_runs/filter", done)
            except OSError:  # the server is still starting
                continue
            completed = [r for r in runs if r["auto_scheduled"]]
        deployment = json.loads(urllib.request.urlopen(f"{api}/deployments/{completed[0]['deployment_id']}",
                                                       timeout=10).read())
        assert deployment["name"] == "ingest-daily"
        assert any((data / "events").rglob("*.parquet"))  # the scheduled ingest really ran
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)  # `recsys serve` itself: it stops the server it started
        try:
            serve.wait(timeout=90)
        finally:
            stop(serve)
            log.close()
    with pytest.raises(OSError):  # the local server went with it
        urllib.request.urlopen(f"{api}/health", timeout=2)
