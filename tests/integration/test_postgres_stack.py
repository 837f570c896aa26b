"""The production stack natively, as docker/compose.yaml runs it, on PostgreSQL (issue 14).

PostgreSQL from the machine's binaries; its databases created by docker/postgres/init-databases.sh and
checked by docker/postgres/healthcheck.sh (which must fail before they exist); `prefect server` and
`mlflow server` with compose's own commands and environment (read from compose.yaml, hosts and ports
mapped to loopback); the work pools and deployments made by docker/deploy.sh, as docker/README.md says;
process workers on pools "cpu" and "gpu". Then: one `pipeline`, `train-weekly` twice at once (the
second waits for the first), two pipelines for different dates at once (they take turns on the data
root). Every training registers its own version and gets its own promotion decision. A credential
planted in the tracking URI must appear in no file, database row or log. Run by .ci/run.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
import urllib.request
from datetime import date, timedelta
from pathlib import Path

import pytest
import yaml
from servers import (
    BIN,
    ROOT,
    Postgres,
    compose_service,
    compose_value,
    free_port,
    postgres_bin,
    start,
    stop,
    wait_healthy,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

SECRET = "Cl13nt-" + secrets.token_hex(6)  # in the workers' tracking URI only
RUN_DATE = date(2026, 4, 2)
TINY = ["generate.n_events=4000", "train.epochs=1", "train.batch_size=16", "train.n_sample=32",
        "model.hidden_size=16", "tracking.system_metrics=false", "evaluate.knn_neighbours=20",
        "orchestrate.io_retry_delay_seconds=0"]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class Api:
    """The few Prefect REST calls the test needs (faster than a CLI process per call)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def call(self, method: str, path: str, body: dict | None = None) -> object:
        request = urllib.request.Request(f"{self.url}{path}", method=method,
                                         data=json.dumps(body).encode() if body is not None else None,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or "null")

    def run(self, deployment: str, parameters: dict) -> str:
        dep = self.call("GET", f"/deployments/name/{deployment}")
        run = self.call("POST", f"/deployments/{dep['id']}/create_flow_run", {"parameters": parameters})
        return run["id"]

    def wait(self, run_ids: list[str], timeout: float) -> dict[str, dict]:
        deadline = time.monotonic() + timeout
        while True:
            runs = {i: self.call("GET", f"/flow_runs/{i}") for i in run_ids}
            if all(r["state_type"] in TERMINAL for r in runs.values()):
                return runs
            if time.monotonic() > deadline:
                raise TimeoutError({i: r["state_name"] for i, r in runs.items()})
            time.sleep(3)

    def log_messages(self, run_ids: list[str]) -> list[str]:
        messages: list[str] = []
        while True:
            page = self.call("POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": run_ids}},
                                                      "limit": 200, "offset": len(messages)})
            messages += [entry["message"] for entry in page]
            if len(page) < 200:
                return messages


@pytest.fixture()
def postgres():
    if postgres_bin() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL binaries missing: .ci/run installs the postgresql package")
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not installed")
    pg = Postgres("recsys", "pg-" + secrets.token_hex(8))
    try:
        yield pg
    finally:
        pg.stop()


def test_postgres_backed_stack_runs_pipelines_trainings_and_promotions(postgres, tmp_path):
    pg, timings, procs = postgres, {}, []
    t_all = time.monotonic()
    timings["postgres_start"] = pg.start()
    dbs = {"PREFECT_DB": "prefect", "MLFLOW_DB": "mlflow"}
    pg_env = pg.env(**dbs, PGPORT_CHECK=str(pg.port))
    health = ["sh", str(ROOT / "docker/postgres/healthcheck.sh")]
    assert subprocess.run(health, env=pg_env, capture_output=True).returncode != 0  # no databases yet
    subprocess.run(["sh", str(ROOT / "docker/postgres/init-databases.sh")], env=pg_env, check=True,
                   capture_output=True)
    assert subprocess.run(health, env=pg_env, capture_output=True).returncode == 0
    assert subprocess.run(health, env={**pg_env, "MLFLOW_DB": "missing"}, capture_output=True).returncode != 0

    prefect_port, mlflow_port = free_port(), free_port()
    values = {"POSTGRES_USER": pg.user, "POSTGRES_PASSWORD": pg.password, "PREFECT_PORT": str(prefect_port),
              "MLFLOW_PORT": str(mlflow_port), **dbs}
    artifacts = tmp_path / "mlartifacts"

    def mapped(arg: str, port: int) -> str:
        arg = compose_value(str(arg), values).replace("@postgres:5432", f"@127.0.0.1:{pg.port}")
        arg = arg.replace("0.0.0.0", "127.0.0.1").replace("/mlartifacts", str(artifacts))
        return f"--port={port}" if arg.startswith("--port=") else arg

    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    base.update({"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                 "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true"})
    logs = tmp_path / "logs"
    logs.mkdir()
    try:
        prefect_svc, mlflow_svc = compose_service("prefect-server"), compose_service("mlflow")
        cmd = [mapped(a, prefect_port) for a in prefect_svc["command"]]
        cmd[cmd.index("--port") + 1] = str(prefect_port)
        env = {**base, **{k: mapped(v, prefect_port) for k, v in prefect_svc["environment"].items()}}
        assert env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
        procs.append(prefect := start([str(BIN / cmd[0]), *cmd[1:]], env, logs / "prefect-server.log"))
        cmd = [mapped(a, mlflow_port) for a in mlflow_svc["command"]]
        assert any(a.startswith("--backend-store-uri=postgresql+psycopg2://") for a in cmd)
        procs.append(mlflow := start([str(BIN / cmd[0]), *cmd[1:]], base, logs / "mlflow-server.log"))
        timings["prefect_healthy"] = wait_healthy(f"http://127.0.0.1:{prefect_port}/api/health", prefect, 240,
                                                  logs / "prefect-server.log")
        timings["mlflow_healthy"] = wait_healthy(f"http://127.0.0.1:{mlflow_port}/health", mlflow, 240,
                                                 logs / "mlflow-server.log")

        # the platform's config: the tracking URI (with its credential) lives in conf/tracking.yaml
        conf = tmp_path / "conf"
        shutil.copytree(ROOT / "conf", conf)
        tracking = yaml.safe_load((conf / "tracking.yaml").read_text())
        tracking["tracking_uri"] = f"http://recsys:{SECRET}@127.0.0.1:{mlflow_port}"
        (conf / "tracking.yaml").write_text(yaml.safe_dump(tracking))
        data = tmp_path / "data"
        worker_env = compose_service("worker-cpu")["environment"]
        client = {**base, **{k: compose_value(str(v), values) for k, v in worker_env.items()},
                  "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
                  "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
                  "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",  # conf/ wins; never used
                  "RECSYS_DATA_ROOT": str(data), "RECSYS_CONF_DIR": str(conf), "RECSYS_APP_DIR": str(ROOT),
                  "PREFECT_WORKER_QUERY_SECONDS": "2"}

        t0 = time.monotonic()
        deploy = subprocess.run(["sh", "docker/deploy.sh"], env=client, cwd=ROOT, capture_output=True,
                                text=True, timeout=300)
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
        timings["deploy"] = time.monotonic() - t0
        for name in ("worker-cpu", "worker-gpu"):
            cmd = [a for a in compose_service(name)["command"] if a != "--with-healthcheck"]
            procs.append(start([str(BIN / cmd[0]), *cmd[1:]], client, logs / f"{name}.log"))

        api = Api(client["PREFECT_API_URL"])

        def params(day: date) -> dict:
            return {"run_date": day.isoformat(), "overrides": TINY}

        t0 = time.monotonic()
        first = api.run("pipeline/pipeline", params(RUN_DATE))
        runs = api.wait([first], 600)
        assert runs[first]["state_type"] == "COMPLETED", _tail(logs)
        timings["pipeline"] = time.monotonic() - t0

        t0 = time.monotonic()
        weekly = [api.run("train/train-weekly", params(RUN_DATE + timedelta(days=d))) for d in (3, 10)]
        runs = api.wait(weekly, 900)
        assert all(r["state_type"] == "COMPLETED" for r in runs.values()), _tail(logs)
        a, b = sorted(runs.values(), key=lambda r: r["start_time"])
        assert b["start_time"] >= a["end_time"]  # one at a time: the second waited
        timings["train_weekly_x2"] = time.monotonic() - t0

        t0 = time.monotonic()
        pair = [api.run("pipeline/pipeline", params(RUN_DATE + timedelta(days=d))) for d in (1, 2)]
        runs = api.wait(pair, 900)
        assert all(r["state_type"] == "COMPLETED" for r in runs.values()), _tail(logs)
        assert any("waits for the data root" in m for m in api.log_messages(pair))  # took turns
        timings["pipelines_x2_at_once"] = time.monotonic() - t0
        for day in (RUN_DATE, RUN_DATE + timedelta(days=1), RUN_DATE + timedelta(days=2)):
            assert (data / "exports" / "recs" / f"run_date={day}" / "_manifest.json").is_file()

        # every training registered its own version, and that version got its own decision
        from mlflow import MlflowClient

        # registry_uri too: an in-process test before this one may have set MLflow's global registry URI
        uri = f"http://127.0.0.1:{mlflow_port}"
        store = MlflowClient(tracking_uri=uri, registry_uri=uri)
        versions = store.search_model_versions("name='recsys-gru4rec'")
        assert len(versions) == 5  # pipeline, two weekly trainings, two pipelines
        assert len({v.run_id for v in versions}) == 5
        assert all(v.tags.get("promotion.decision") in ("promoted", "rejected") for v in versions)
        champion = store.get_model_version_by_alias("recsys-gru4rec", "champion")
        assert champion.tags["promotion.decision"] == "promoted"
        experiment = store.get_experiment_by_name("recsys")
        runs = store.search_runs([experiment.experiment_id])
        assert {r.info.status for r in runs} == {"FINISHED"}  # trainings and the exports' score runs
        trained = [r for r in runs if r.data.tags.get("recsys.kind") == "train"]
        assert len(trained) == 5 and {r.data.tags.get("recsys.kind") for r in runs} == {"train", "score"}
        assert all(r.data.params["tracking.tracking_uri"] == f"http://***@127.0.0.1:{mlflow_port}"
                   for r in trained)
        assert any(artifacts.rglob("checkpoint.pt")) and not (data / "mlflow" / "mlflow.db").exists()
        links = api.call("POST", "/artifacts/filter", {"artifacts": {"key": {"any_": ["mlflow-run"]}}})
        assert links and all(f"http://127.0.0.1:{mlflow_port}/#/" in a["data"] for a in links)
    finally:
        for proc in reversed(procs):  # workers first, then MLflow, then the Prefect server
            stop(proc)

    # the planted credential: nowhere in files, databases or logs
    leaks = [str(p) for p in tmp_path.rglob("*")
             if p.is_file() and p.parent != conf and SECRET.encode() in p.read_bytes()]
    assert leaks == []
    for db in ("mlflow", "prefect"):
        assert SECRET not in pg.dump(db), db
    timings["total"] = time.monotonic() - t_all
    print("postgres stack timings (s): " + json.dumps({k: round(v, 1) for k, v in timings.items()}))


def _tail(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(logs.iterdir()))
