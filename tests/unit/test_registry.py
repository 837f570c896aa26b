"""Registry against a real embedded SQLite store (no MLflow mocks): the champion loads through
``models:/NAME@champion`` and predicts exactly like the in-process model, every branch of the promotion
gate, and a checkpoint written on another device type.

There is no GPU on the test machines: a "GPU checkpoint" is simulated by saving with the storage location
tag ``cuda:0`` (what ``torch.save`` records for CUDA tensors), which a CPU-only machine can only load with
``map_location``.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow_fixtures import constant_checkpoint, copy_checkpoint, make_world, train_checkpoint

from recsys.model.checkpoint import build_model, load_checkpoint
from recsys.model.pyfunc import recommend
from recsys.tracking.promotion import decide, promote
from recsys.tracking.registry import CHALLENGER, CHAMPION, RegistryError, resolve_model
from recsys.tracking.runs import register_checkpoint
from recsys.tracking.store import resolve_tracking_uri


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store, a split, and a weak (1 epoch) and a strong (3 epochs) checkpoint of the same data."""
    config = make_world(tmp_path_factory.mktemp("registry") / "data", tracking={"system_metrics": False})
    weak = train_checkpoint(config, "weak", epochs=1)
    strong = train_checkpoint(config, "strong", epochs=3)
    constant = constant_checkpoint(strong, config.paths.checkpoints_dir / "constant" / "best.pt")
    return config, {"weak": weak, "strong": strong, "constant": constant}


def _client(config):
    uri = resolve_tracking_uri(config)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _alias(config, alias):
    return str(_client(config).get_model_version_by_alias(config.tracking.registered_model, alias).version)


def _tags(config, version):
    return _client(config).get_model_version(config.tracking.registered_model, version).tags


def test_promotion_gate_branches_on_real_versions(world):
    config, ckpt = world
    name = config.tracking.registered_model
    with pytest.raises(RegistryError):  # nothing registered yet
        promote(config)

    # first model ever: champion because it beats most-popular
    v_weak = register_checkpoint(config, ckpt["weak"])["model_version"]
    assert _alias(config, CHALLENGER) == v_weak
    first = promote(config)
    assert first.promoted and "first champion" in first.reason and _alias(config, CHAMPION) == v_weak
    tags = _tags(config, v_weak)
    assert tags["promotion.decision"] == "promoted" and tags["promotion.reason"] == first.reason
    assert json.loads(tags["promotion.challenger_metrics"])["mrr@20"] == pytest.approx(
        first.challenger_metrics["mrr@20"], abs=1e-6)
    assert "mrr@20" in json.loads(tags["promotion.popular_metrics"])
    assert promote(config).reason.endswith("already the champion")

    # loses to most-popular: never champion
    v_const = register_checkpoint(config, ckpt["constant"])["model_version"]
    lost = promote(config)
    assert not lost.promoted and "does not beat most-popular" in lost.reason
    assert _alias(config, CHAMPION) == v_weak and _tags(config, v_const)["promotion.decision"] == "rejected"

    # better, but below a (huge) margin; then better with the default margin
    v_strong = register_checkpoint(config, ckpt["strong"])["model_version"]
    config.promote.min_improvement = 100.0
    margin = promote(config)
    assert not margin.promoted and "below the required margin" in margin.reason
    assert margin.challenger_metrics["mrr@20"] > margin.champion_metrics["mrr@20"]
    config.promote.min_improvement = 0.0
    better = promote(config)
    assert better.promoted and better.champion_version == v_weak and _alias(config, CHAMPION) == v_strong
    assert _tags(config, v_weak)["promotion.replaced_by"] == v_strong
    assert json.loads(_tags(config, v_strong)["promotion.champion_metrics"])["mrr@20"] == pytest.approx(
        better.champion_metrics["mrr@20"], abs=1e-6)

    # worse than the champion (the weak model again, as a new file: the same file keeps its version)
    assert register_checkpoint(config, ckpt["weak"])["model_version"] == v_weak
    register_checkpoint(config, copy_checkpoint(ckpt["weak"], config.paths.data_root / "weak-copy.pt"))
    worse = promote(config)
    assert not worse.promoted and "not better than champion" in worse.reason
    assert _alias(config, CHAMPION) == v_strong

    # a challenger whose stored checkpoint is corrupt never becomes champion
    v_bad = register_checkpoint(config, copy_checkpoint(ckpt["strong"], config.paths.data_root / "bad.pt"))[
        "model_version"]
    source = _client(config).get_model_version(name, v_bad).source
    model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(
        config.paths.data_root / "peek")))
    stored = _stored_checkpoint(config, model_dir)
    stored.write_bytes(stored.read_bytes()[:100])  # truncated in the artifact store
    corrupt = promote(config)
    assert not corrupt.promoted and "could not be loaded" in corrupt.reason
    assert _alias(config, CHAMPION) == v_strong and _tags(config, v_bad)["promotion.decision"] == "rejected"


def _stored_checkpoint(config, downloaded: Path) -> Path:
    """The artifact-store copy (not the download) of a model's checkpoint, found by its bytes."""
    wanted = (downloaded / "artifacts" / "checkpoint.pt").read_bytes()
    root = config.paths.mlflow_dir / "artifacts"
    matches = [p for p in root.rglob("checkpoint.pt") if p.read_bytes() == wanted]
    # the newest logged model holding these bytes is the one just registered
    return max(matches, key=lambda p: p.stat().st_mtime_ns)


def test_decide_edges():
    pop = {"mrr@20": 0.1, "n_queries": 10}
    assert decide("mrr@20", 0.0, {"mrr@20": 0.1, "n_queries": 10}, pop, None, None)[0] is False  # tie
    assert decide("mrr@20", 0.0, {"mrr@20": 0.3, "n_queries": 10}, pop, {"mrr@20": 0.3, "n_queries": 10},
                  "1")[0] is False  # equal to the champion
    assert decide("mrr@20", 0.1, {"mrr@20": 0.33, "n_queries": 10}, pop, {"mrr@20": 0.3, "n_queries": 10},
                  "1")[0] is False  # +10 % is not more than 10 %
    assert decide("mrr@20", 0.1, {"mrr@20": 0.34, "n_queries": 10}, pop, {"mrr@20": 0.3, "n_queries": 10},
                  "1")[0] is True
    # the gate quotes the metric under the name and value the evaluation tables print (over all targets)
    promoted, reason = decide("mrr@20", 0.0, {"mrr@20": 0.25, "n_queries": 10, "unseen_target": 10}, pop,
                              {"mrr@20": 0.3, "n_queries": 20}, "1")
    assert promoted is False and "mrr@20=0.2500" in reason and "[all]" not in reason


def test_champion_pyfunc_predictions_equal_in_process_model(world):
    config, ckpt = world
    out = register_checkpoint(config, ckpt["strong"])
    client = _client(config)
    client.set_registered_model_alias(config.tracking.registered_model, CHAMPION, out["model_version"])
    uri = f"models:/{config.tracking.registered_model}@{CHAMPION}"

    resolved = resolve_model(config, uri)
    assert resolved.version == out["model_version"] and resolved.run_id == out["run_id"]
    assert resolved.checkpoint_path.read_bytes() == ckpt["strong"].read_bytes()
    assert resolve_model(config, str(ckpt["strong"])).checkpoint_path == ckpt["strong"].resolve()
    with pytest.raises(RegistryError):
        resolve_model(config, f"models:/{config.tracking.registered_model}@nobody")

    loaded = mlflow.pyfunc.load_model(uri)
    vocab_ids = load_checkpoint(ckpt["strong"]).vocab.item_ids.to_list()
    users = ["u-a", "u-b", "u-c"]
    histories = [vocab_ids[:5], [vocab_ids[7], 10_000], [10_001]]  # unknown items; an unknown-only history
    got = loaded.predict(pd.DataFrame({"user_id": users, "history": histories}), params={"top_k": 5})
    source = load_checkpoint(ckpt["strong"])
    want = recommend(build_model(source), source.vocab, users, histories, top_k=5,
                     policy=source.policy,
                     max_history=source.config.score.max_history)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want)
    assert list(got.columns)[:4] == ["user_id", "rank", "item_id", "score"]
    assert got.groupby("user_id").size().tolist() == [5, 5, 5]
    assert set(got.loc[got["user_id"] == "u-c", "source"]) == {"popular"}
    assert not set(got.loc[got["user_id"] == "u-a", "item_id"]) & set(vocab_ids[:5])  # watched excluded
    signature = loaded.metadata.signature
    assert signature.inputs.input_names() == ["user_id", "history"]
    assert signature.params.to_dict()[0]["name"] == "top_k"


def test_checkpoint_saved_on_another_device_loads_on_cpu(world, tmp_path, monkeypatch):
    """Simulated GPU checkpoint (location tag cuda:0): needs map_location, which every loader passes."""
    config, ckpt = world
    source = load_checkpoint(ckpt["strong"])
    payload = torch.load(ckpt["strong"], weights_only=True)
    gpu_file = tmp_path / "trained-on-gpu.pt"
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(payload, gpu_file)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(gpu_file, weights_only=True)  # what a naive loader would hit
    moved = load_checkpoint(gpu_file)
    assert all(t.device.type == "cpu" for t in moved.model_state.values())

    out = register_checkpoint(config, gpu_file)
    loaded = mlflow.pyfunc.load_model(f"models:/{config.tracking.registered_model}/{out['model_version']}")
    frame = pd.DataFrame({"user_id": [1], "history": [source.vocab.item_ids.to_list()[:3]]})
    got = loaded.predict(frame, params={"top_k": 3})
    want = recommend(build_model(source), source.vocab, [1], frame["history"].tolist(), top_k=3,
                     policy=source.policy,
                     max_history=source.config.score.max_history)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want)


def test_recommend_matches_a_direct_model_call_and_keeps_the_last_history_items(world):
    """``recommend`` (what the pyfunc serves) against final_states/score_items on one user at a time."""
    import numpy as np
    import polars as pl

    from recsys.model.pyfunc import histories_to_batch

    _, ckpt = world
    source = load_checkpoint(ckpt["strong"])
    model, vocab = build_model(source), source.vocab
    ids = vocab.item_ids.to_list()
    histories = [[ids[3], 99_999, ids[1], ids[4]], [ids[2]], [ids[5], ids[6], ids[7]]]
    got = recommend(model, vocab, ["a", "b", "c"], histories, top_k=4, exclude_seen=True, max_history=2)
    for user, history in zip(["a", "b", "c"], histories, strict=True):
        known = [i for i in vocab.index_of(pl.Series(history)).tolist() if i >= 0][-2:]  # last 2 known
        with torch.no_grad():
            state = model.final_states(torch.tensor([known]), torch.tensor([len(known)]))  # [1, H]
            scores = model.score_items(state)[0]  # [n_items]
        scores[torch.tensor(known)] = -torch.inf
        want = np.asarray(ids)[torch.topk(scores, 4).indices.numpy()].tolist()
        assert got.loc[got["user_id"] == user, "item_id"].tolist() == want
    items, lengths = histories_to_batch(histories, vocab, max_history=2)
    assert lengths.tolist() == [2, 1, 2] and items.shape == (3, 2)


def test_recommend_adds_the_learned_history_bias_only_when_watched_items_are_kept():
    import polars as pl

    from recsys.config import ModelConfig
    from recsys.data.vocab import Vocab
    from recsys.model.gru4rec import GRU4Rec

    vocab = Vocab.from_items(pl.Series("item_id", [10, 11, 12, 13, 14, 15], dtype=pl.Int64))
    torch.manual_seed(0)
    model = GRU4Rec(len(vocab), ModelConfig(hidden_size=4, history_bias=True)).eval()
    model.history_bias.data.fill_(100.0)  # watched items first, each offset once (12 is listed twice)
    history = [[12, 14, 12]]
    kept = recommend(model, vocab, ["u"], history, top_k=6, exclude_seen=False)
    assert kept["item_id"].tolist()[:2] in ([12, 14], [14, 12])
    with torch.no_grad():
        idx = vocab.index_of(pl.Series(history[0])).tolist()
        plain = model.score_items(model.final_states(torch.tensor([idx]), torch.tensor([3])))[0]
    top = kept.set_index("item_id")["score"]
    assert top[12] == pytest.approx(float(plain[idx[0]]) + 100.0)
    assert top[10] == pytest.approx(float(plain[0]))
    masked = recommend(model, vocab, ["u"], history, top_k=6, exclude_seen=True)
    assert set(masked["item_id"]) == {10, 11, 13, 15}
