"""The docker stack's wiring without Docker: real servers on loopback, a worker running a deployment.

`prefect server start` (SQLite) and `mlflow server` (SQLite backend store, artifacts proxied through the
server with --serve-artifacts, as in docker/compose.yaml) run natively on 127.0.0.1; docker/deploy.sh
creates the pools and deploys flows/prefect.yaml; a process worker polls work pool "cpu"; one `pipeline`
run is triggered and watched to completion. The run must leave an export on disk and a champion in the
MLflow server's registry. About 2 minutes on 2 cores: marked `integration`. The PostgreSQL variant (the
one CI runs) is tests/integration/test_postgres_stack.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from flow_constants import RUN_DATE, TINY

from flows.local_server import stop_process_group

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    handle = log.open("w")
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    stop_process_group(proc, timeout=20)


@pytest.fixture()
def stack(tmp_path):
    """Prefect server + MLflow server on free loopback ports; yields the environment for clients."""
    prefect_port, mlflow_port = free_port(), free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    base.update({
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    })
    procs: list[subprocess.Popen] = []
    try:
        prefect = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                         "--port", str(prefect_port)], base, tmp_path / "prefect-server.log")
        procs.append(prefect)
        mlflow = start([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                        "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                        "--serve-artifacts", "--artifacts-destination", str(tmp_path / "mlartifacts")],
                       base, tmp_path / "mlflow-server.log")
        procs.append(mlflow)
        wait_healthy(f"http://127.0.0.1:{prefect_port}/api/health", prefect, 180,
                     tmp_path / "prefect-server.log")
        wait_healthy(f"http://127.0.0.1:{mlflow_port}/health", mlflow, 180, tmp_path / "mlflow-server.log")
        client_env = {
            **base,
            "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
            "RECSYS_DATA_ROOT": str(tmp_path / "data"),
            "RECSYS_APP_DIR": str(ROOT),  # the pull step of flows/prefect.yaml
            "PREFECT_LOGGING_EXTRA_LOGGERS": "recsys",
        }
        yield client_env, tmp_path, procs
    finally:
        for proc in reversed(procs):  # workers first, then MLflow, then the Prefect server
            stop(proc)


def test_worker_runs_the_pipeline_deployment(stack):
    env, tmp, procs = stack
    t0 = time.monotonic()
    # pools, then every deployment, exactly as docker/README.md does it
    deploy = subprocess.run(["sh", "docker/deploy.sh"], env={**env, "PATH": f"{BIN}:{env['PATH']}"},
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    worker = start([str(BIN / "prefect"), "worker", "start", "--pool", "cpu", "--type", "process"],
                   env, tmp / "worker.log")
    procs.append(worker)
    params = {"run_date": RUN_DATE.isoformat(), "overrides": TINY}
    run = subprocess.run(
        [str(BIN / "prefect"), "deployment", "run", "pipeline/pipeline", "--params", json.dumps(params),
         "--watch", "--watch-timeout", "420"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=480,
    )
    elapsed = time.monotonic() - t0
    logs = (tmp / "worker.log").read_text()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + logs[-5000:]
    assert "Completed" in run.stdout + run.stderr

    export = tmp / "data" / "exports" / "recs" / f"run_date={RUN_DATE.isoformat()}"
    assert (export / "_manifest.json").is_file(), logs[-5000:]
    manifest = json.loads((export / "_manifest.json").read_text())
    assert manifest["rows"] > 0

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias("recsys-gru4rec", "champion")
    assert str(champion.version) == manifest["model"]["version"]
    assert not (tmp / "data" / "mlflow" / "mlflow.db").exists()  # the server holds it all, no embedded store
    assert any((tmp / "mlartifacts").rglob("checkpoint.pt"))  # artifacts proxied into the server's store
    print(f"integration: deploy + worker run of the pipeline in {elapsed:.0f} s")
