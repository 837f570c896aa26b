"""Tracking against a real embedded SQLite store in a temp dir (no MLflow mocks): what one training run
records, an unreachable server, two training processes at once, and a resumable tuning search."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow_fixtures import free_port, make_config, make_world

from recsys.tracking.lineage import snapshot_hash
from recsys.tracking.registry import CHALLENGER
from recsys.tracking.runs import register_checkpoint, tracked_training
from recsys.tracking.store import TrackingUnavailableError, resolve_tracking_uri

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One tracked training run (1 epoch), with system metrics sampled ten times a second and logged
    at every sample: on an idle machine the whole run takes well under a second."""
    config = make_world(tmp_path_factory.mktemp("tracked") / "data")
    mlflow.set_system_metrics_sampling_interval(0.1)
    mlflow.set_system_metrics_samples_before_logging(1)
    try:
        out = tracked_training(config)
    finally:
        mlflow.set_system_metrics_sampling_interval(None)
        mlflow.set_system_metrics_samples_before_logging(None)
    return config, out


def on_shared_store(tracked, root: Path, name: str, **sections: dict):
    """A fresh world whose runs go to the ``tracked`` store under their own experiment and registered
    model (creating a store costs seconds; the experiments keep the tests independent)."""
    store_config, _ = tracked
    tracking = {"tracking_uri": store_config.tracking.tracking_uri, "experiment": name,
                "registered_model": f"model-{name}", **sections.pop("tracking", {})}
    return make_world(root, tracking=tracking, **sections)


def test_run_records_params_metrics_lineage_and_artifacts(tracked):
    config, out = tracked
    client = MlflowClient(tracking_uri=out["tracking_uri"], registry_uri=out["tracking_uri"])
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["train.batch_size"] == "8" and params["model.hidden_size"] == "8"
    assert params["train.mask_seen_negatives"] == "None"  # automatic; what it resolved to is logged too
    # the policy, resolved from the split's record (none here: the config's sessions.mode), is logged too
    assert params["resolved.policy.exclude"] == ("all" if config.sessions.mode == "user" else "completed")
    assert params["resolved.train.mask_seen_negatives"] == str(config.sessions.mode == "user")
    # per epoch, step = epoch
    for key in ("train_loss", "valid_mrr_20", "events_per_second", "epoch_seconds"):
        assert [m.step for m in client.get_metric_history(out["run_id"], key)] == [1], key
    # final test metrics of the GRU and of both baselines, '@' replaced
    for prefix in ("test_gru", "test_most_popular", "test_item_knn"):
        assert 0.0 <= metrics[f"{prefix}_mrr_20"] <= 1.0
    assert any(key.startswith("system/") for key in metrics), sorted(metrics)
    assert metrics["best_epoch"] == 1 and metrics["best_valid_mrr_20"] == metrics["valid_mrr_20"]
    assert tags["data.snapshot_hash"] == snapshot_hash(config.paths.split_dir)
    assert tags["data.rows.train"] == "60" and tags["seed"] == str(config.train.seed)
    assert tags["device"] == "cpu" and "versions.torch" in tags and "versions.mlflow" in tags
    if "code.git_sha" in tags:
        assert len(tags["code.git_sha"]) == 40
    artifacts = {f.path for f in client.list_artifacts(out["run_id"])}
    artifacts |= {f.path for f in client.list_artifacts(out["run_id"], "report")}
    assert {"config.yaml", "report/metrics_per_epoch.png", "report/metrics_per_epoch.csv",
            "report/test_metrics.md"} <= artifacts
    local = Path(mlflow.artifacts.download_artifacts(run_id=out["run_id"], artifact_path="report"))
    assert (local / "metrics_per_epoch.png").read_bytes()[:4] == b"\x89PNG"
    # artifacts live under the data root, the model is registered as the challenger
    assert run.info.artifact_uri.startswith((config.paths.mlflow_dir / "artifacts").resolve().as_uri())
    version = client.get_model_version_by_alias(config.tracking.registered_model, CHALLENGER)
    assert str(version.version) == out["model_version"] and version.run_id == out["run_id"]


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = make_config(tmp_path / "data")
    config.tracking.tracking_uri = None
    default = (tmp_path / "data" / "mlflow" / "mlflow.db").resolve()
    assert resolve_tracking_uri(config) == f"sqlite:///{default}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri(config) == "http://127.0.0.1:5999"
    config.tracking.tracking_uri = "sqlite:////elsewhere/m.db"
    assert resolve_tracking_uri(config) == "sqlite:////elsewhere/m.db"


def test_unreachable_server_keeps_checkpoint_and_register_recovers(tracked, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    config = make_world(tmp_path / "data", tracking={"tracking_uri": url, "retry_window_seconds": 0.3,
                                                     "retry_backoff_seconds": 0.05})
    start = time.monotonic()
    with pytest.raises(TrackingUnavailableError) as info:
        tracked_training(config)
    message = str(info.value)
    assert url in message and "recsys register --checkpoint" in message and "time(s) over 0.3 s" in message
    checkpoint = config.paths.checkpoints_dir / config.train.run_name / "best.pt"
    assert checkpoint.is_file() and str(checkpoint.resolve()) in message
    assert time.monotonic() - start < 60  # bounded: no hanging HTTP retries

    # the server is back (here: the embedded store): the kept checkpoint is logged and registered
    recovered = on_shared_store(tracked, tmp_path / "data", "recovered")
    out = register_checkpoint(recovered, checkpoint)
    client = MlflowClient(tracking_uri=out["tracking_uri"], registry_uri=out["tracking_uri"])
    version = client.get_model_version_by_alias(recovered.tracking.registered_model, CHALLENGER)
    assert str(version.version) == out["model_version"]
    run = client.get_run(out["run_id"])
    assert run.data.tags["recsys.kind"] == "register" and "valid_mrr_20" in run.data.metrics


_TRAIN_ONE = """
import json, sys
sys.path.insert(0, {tests!r})
from mlflow_fixtures import make_config
from recsys.tracking.runs import tracked_training
config = make_config(__import__("pathlib").Path({root!r}), train={{"run_name": sys.argv[1]}})
print(json.dumps(tracked_training(config)["run_id"]))
"""


def test_two_training_processes_at_once_are_both_recorded(tmp_path):
    """Two processes start together on a store that does not exist yet (table creation included)."""
    root = tmp_path / "data"
    config = make_world(root)
    code = _TRAIN_ONE.format(tests=str(Path(__file__).parent), root=str(root))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code, name], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for name in ("first", "second")]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
    run_ids = {json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs}
    assert len(run_ids) == 2
    uri = resolve_tracking_uri(config)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for run_id in run_ids:
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and "test_gru_mrr_20" in run.data.metrics
        assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1]
    versions = client.search_model_versions(f"name = '{config.tracking.registered_model}'")
    assert sorted(v.run_id for v in versions) == sorted(run_ids)


def test_tune_nested_runs_best_child_and_resume(tracked, tmp_path):
    from recsys.training.tune import tune

    config = on_shared_store(tracked, tmp_path / "data", "tune",
                             tune={"n_trials": 2, "epochs": 1, "prune": False})
    config.tune.space = {"train.learning_rate": {"type": "float", "low": 0.02, "high": 0.2, "log": True},
                         "model.hidden_size": {"type": "categorical", "choices": [4, 8]}}
    first = tune(config)
    config.tune.n_trials = 3  # resume: one more trial, same study, same parent run
    second = tune(config)
    assert second["parent_run_id"] == first["parent_run_id"] and second["n_trials"] == 3
    client = MlflowClient(tracking_uri=resolve_tracking_uri(config))
    parent = client.get_run(second["parent_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 3 and all("best_valid_mrr_20" in c.data.metrics for c in children)
    best = max(children, key=lambda c: c.data.metrics["best_valid_mrr_20"])
    assert parent.data.tags["best_run_id"] == best.info.run_id == second["best_run_id"]
    assert parent.data.metrics["best_valid_mrr_20"] == pytest.approx(best.data.metrics["best_valid_mrr_20"])


def test_resume_continues_the_killed_run(tracked, tmp_path, monkeypatch):
    """Killed after epoch 1; ``resume=True`` continues the same checkpoint and the same MLflow run."""
    import recsys.tracking.runs as tracking

    config = on_shared_store(tracked, tmp_path / "data", "resume", train={"epochs": 3},
                             tracking={"system_metrics": False})
    log_epoch = tracking.EpochLogger.__call__

    def killed_after_first_epoch(self, info):
        log_epoch(self, info)
        if info["epoch"] == 1:
            raise KeyboardInterrupt("simulated kill")

    with monkeypatch.context() as patch:
        patch.setattr(tracking.EpochLogger, "__call__", killed_after_first_epoch)
        with pytest.raises(KeyboardInterrupt):
            tracked_training(config)
    out = tracked_training(config, resume=True)
    client = MlflowClient(tracking_uri=out["tracking_uri"])
    runs = client.search_runs([client.get_run(out["run_id"]).info.experiment_id])
    assert [r.info.run_id for r in runs] == [out["run_id"]] and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(out["run_id"], "valid_mrr_20")] == [1, 2, 3]


@pytest.mark.integration
def test_ui_serves_the_store_on_loopback(tracked, tmp_path):
    """`recsys ui` on a free loopback port: HTML, runs/search and the champion alias; stops cleanly."""
    import signal
    import urllib.request

    config, out = tracked
    port = free_port()
    args = [sys.executable, "-m", "recsys.cli", "ui", "--port", str(port),
            "--set", f"paths.data_root={config.paths.data_root}",
            "--set", f"tracking.tracking_uri={config.tracking.tracking_uri}"]
    log = (tmp_path / "ui.log").open("w")
    proc = subprocess.Popen(args, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "UI did not start"
            time.sleep(1)
        with urllib.request.urlopen(base + "/", timeout=10) as response:
            assert b"<title>MLflow</title>" in response.read()
        request = urllib.request.Request(
            f"{base}/api/2.0/mlflow/runs/search", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"experiment_ids": [mlflow.get_run(out["run_id"]).info.experiment_id]}).encode())
        with urllib.request.urlopen(request, timeout=10) as response:
            runs = json.loads(response.read())["runs"]
        assert out["run_id"] in {r["info"]["run_id"] for r in runs}
        name = config.tracking.registered_model
        alias = f"{base}/api/2.0/mlflow/registered-models/alias?name={name}&alias=challenger"
        with urllib.request.urlopen(alias, timeout=10) as response:
            assert json.loads(response.read())["model_version"]["run_id"] == out["run_id"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{base}/health", timeout=2)
