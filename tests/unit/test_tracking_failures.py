"""Issue 14's failures against a real embedded store (SQLite, no MLflow mocks): outages during training,
a process killed while training or registering, resume, registry downloads, promotion by version and the
champion's compare-and-set. Every test here failed before the fix it guards.

Outages are simulated at the one call that reaches the store (``mlflow.log_metrics`` raising the
``ConnectionError`` a stopped server gives); the real server restart is tests/integration. A kill -9 is a
child process ending with ``os._exit`` (no clean-up runs, exactly what a kill leaves behind).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from mlflow_fixtures import constant_checkpoint, make_config, make_world, train_checkpoint

import recsys.tracking.registry as registry
import recsys.tracking.runs as runs
from recsys.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from recsys.model.gru4rec import GRU4Rec
from recsys.tracking import promotion
from recsys.tracking.registry import CHALLENGER, CHAMPION, RegistryError, resolve_model
from recsys.tracking.runs import RUN_ID_KEY, register_checkpoint, tracked_training
from recsys.tracking.store import resolve_tracking_uri

REPO = Path(__file__).resolve().parents[2]


def client_of(config) -> MlflowClient:
    uri = resolve_tracking_uri(config)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def versions_of(config) -> list:
    return client_of(config).search_model_versions(f"name='{config.tracking.registered_model}'")


def quiet(root: Path, **sections: dict):
    tracking = {"system_metrics": False, **sections.pop("tracking", {})}
    return make_world(root, tracking=tracking, **sections)


# --- outages and crashes during training ----------------------------------------------------------------


def test_epoch_metrics_missed_during_an_outage_are_sent_when_the_store_is_back(tmp_path, monkeypatch):
    config = quiet(tmp_path / "data", train={"epochs": 4, "patience": 10})
    real = mlflow.log_metrics
    refused: list[int] = []

    def store_down_for_epochs_2_and_3(metrics, step=None, **kw):
        if step in (2, 3) and step not in refused:
            refused.append(step)
            raise ConnectionError("Connection refused")
        return real(metrics, step=step, **kw)

    # the store refuses each of epochs 2 and 3 once (down while they end), then answers again
    monkeypatch.setattr(mlflow, "log_metrics", store_down_for_epochs_2_and_3)
    out = tracked_training(config)
    client = client_of(config)
    assert refused == [2, 3]
    assert [m.step for m in client.get_metric_history(out["run_id"], "valid_mrr_20")] == [1, 2, 3, 4]
    assert client.get_run(out["run_id"]).info.status == "FINISHED"


_KILLED_AFTER_EPOCH_1 = """
import os, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from mlflow_fixtures import make_world
import recsys.tracking.runs as runs
config = make_world(Path({root!r}), model={{"hidden_size": 16}}, train={{"epochs": 3, "patience": 10}},
                    tracking={{"system_metrics": False}})
log_epoch = runs.EpochLogger.__call__
def killed(self, info):
    log_epoch(self, info)
    os._exit(137)  # no clean-up at all: the run stays RUNNING, like a kill -9
runs.EpochLogger.__call__ = killed
runs.tracked_training(config)
"""


def test_crashed_run_is_closed_and_resume_follows_the_run_recorded_in_the_checkpoint(tmp_path):
    """A run killed with hidden 16, then a fresh run with hidden 32: the fresh start closes the dead run
    as FAILED, and a later resume continues the hidden-32 run recorded in last.pt (it used to attach to
    the older crashed one, whose params describe another model)."""
    root = tmp_path / "data"
    code = _KILLED_AFTER_EPOCH_1.format(tests=str(Path(__file__).parent), root=str(root))
    killed = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 137, killed.stderr[-2000:]
    config = quiet(root, model={"hidden_size": 32}, train={"epochs": 2, "patience": 10})
    client = client_of(config)
    [dead] = client.search_runs([client.get_experiment_by_name(config.tracking.experiment).experiment_id])
    assert dead.info.status == "RUNNING" and dead.data.params["model.hidden_size"] == "16"

    fresh = tracked_training(config)
    assert client.get_run(dead.info.run_id).info.status == "FAILED"
    last = config.paths.checkpoints_dir / config.train.run_name / "last.pt"
    assert load_checkpoint(last).extra[RUN_ID_KEY] == fresh["run_id"]

    resumed = tracked_training(config, resume=True)
    assert resumed["run_id"] == fresh["run_id"] != dead.info.run_id
    assert client.get_run(resumed["run_id"]).data.params["model.hidden_size"] == "32"
    assert len(versions_of(config)) == 1  # the resumed run already had its version: no second one


@pytest.mark.parametrize("where", ["after the version is created", "before the run is closed"])
def test_a_kill_in_the_registration_window_leaves_one_version(tmp_path, monkeypatch, where):
    config = quiet(tmp_path / "data")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("kill -9")

    with monkeypatch.context() as patch:
        if where == "after the version is created":
            patch.setattr(registry, "_crash_point", killed)
        else:
            patch.setattr(runs, "_end_run", killed)
        with pytest.raises(KeyboardInterrupt):
            tracked_training(config)
    out = tracked_training(config, resume=True)
    [version] = versions_of(config)
    assert str(version.version) == out["model_version"] and version.run_id == out["run_id"]
    assert str(client_of(config).get_model_version_by_alias(config.tracking.registered_model,
                                                            CHALLENGER).version) == out["model_version"]


# --- registering and downloading ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    config = quiet(tmp_path_factory.mktemp("failures") / "data")
    return config, train_checkpoint(config, "one", epochs=1)


def test_register_is_idempotent_and_refuses_non_finite_weights(trained, tmp_path):
    config, checkpoint = trained
    config = make_config(config.paths.data_root, tracking={"registered_model": "idempotent",
                                                           "system_metrics": False})
    first = register_checkpoint(config, checkpoint)
    again = register_checkpoint(config, checkpoint)
    assert again["model_version"] == first["model_version"] and len(versions_of(config)) == 1

    ckpt = load_checkpoint(checkpoint)
    model = GRU4Rec(ckpt.n_items, ckpt.config.model)
    model.load_state_dict({k: torch.full_like(v, float("nan")) for k, v in ckpt.model_state.items()})
    nan = save_checkpoint(tmp_path / "nan.pt", model=model, optimizer=None, config=ckpt.config,
                          vocab=ckpt.vocab, epoch=1, metrics={})
    with pytest.raises(CheckpointError, match="non-finite weights"):
        register_checkpoint(config, nan)
    assert len(versions_of(config)) == 1


def test_cached_downloads_are_checked_against_the_registered_checksum(trained):
    config, checkpoint = trained
    config = make_config(config.paths.data_root, tracking={"registered_model": "checksum"})
    version = register_checkpoint(config, checkpoint)["model_version"]
    uri = f"models:/checksum/{version}"
    cached = resolve_model(config, uri).checkpoint_path
    good = cached.read_bytes()
    cached.write_bytes(good[: len(good) // 2])  # a truncated cache entry
    assert resolve_model(config, uri).checkpoint_path.read_bytes() == good  # fetched again, not reused

    # the stored artifact itself damaged: refused, never cached; repaired: served again
    stored = [p for p in (config.paths.mlflow_dir / "artifacts").rglob("checkpoint.pt")
              if p.read_bytes() == good]
    assert stored
    for path in stored:
        path.write_bytes(good[:100])
    cached.write_bytes(b"")
    with pytest.raises(RegistryError, match="SHA-256"):
        resolve_model(config, uri)
    for path in stored:
        path.write_bytes(good)
    assert resolve_model(config, uri).checkpoint_path.read_bytes() == good


# --- promotion ------------------------------------------------------------------------------------------


def test_promotion_judges_the_given_version_and_the_alias_moves_by_compare_and_set(trained, monkeypatch):
    base, checkpoint = trained
    config = make_config(base.paths.data_root, tracking={"registered_model": "cas", "system_metrics": False})
    strong = train_checkpoint(config, "strong", epochs=3)
    weak = constant_checkpoint(strong, config.paths.checkpoints_dir / "constant" / "best.pt")
    v_weak = register_checkpoint(config, weak)["model_version"]
    v_one = register_checkpoint(config, checkpoint)["model_version"]
    v_strong = register_checkpoint(config, strong)["model_version"]  # @challenger now
    client = client_of(config)
    client.set_registered_model_alias("cas", CHAMPION, v_weak)

    # another promotion moves @champion to v_strong while this one evaluates v_one against v_weak
    evaluate = promotion._evaluate_version
    moved: list[str] = []

    def meanwhile(config_, version, label, with_popular, **kwargs):
        if label == CHAMPION and not moved:
            client.set_registered_model_alias("cas", CHAMPION, v_strong)
            moved.append(v_strong)
        return evaluate(config_, version, label, with_popular, **kwargs)

    monkeypatch.setattr(promotion, "_evaluate_version", meanwhile)
    decision = promotion.promote(config, version=v_one)
    assert decision.challenger_version == v_one  # not @challenger (v_strong)
    assert decision.champion_version == v_strong  # judged again against the newer champion
    champion = str(client.get_model_version_by_alias("cas", CHAMPION).version)
    assert champion == (v_one if decision.promoted else v_strong)  # never blindly over v_strong
    tags = client.get_model_version("cas", v_one).tags
    assert tags["promotion.champion_version"] == v_strong and "promotion.decision" in tags
    assert "promotion.decision" not in client.get_model_version("cas", v_strong).tags
