"""Daily incremental update on real (tiny) synthetic data: vocabulary growth, row initialisation, resume,
a real kill -9, the promotion gate on an updated version, and a new series' next episode in the lists.

The world: a weekly model trained on the synthetic log up to day D; then five more days are ingested
(with titles released in them), sessions and split are rebuilt, and the update runs on that split.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from recsys.config import Config, load_config
from recsys.data.catalogue import ingest_catalogue, load_catalogue
from recsys.data.ingest import ingest_files
from recsys.data.sessions import build_sessions
from recsys.data.split import split_sessions
from recsys.data.synthetic import generate
from recsys.model.checkpoint import build_model, load_checkpoint
from recsys.schemas import ITEM_ID, TS, USER_ID
from recsys.training.train import train_model
from recsys.training.update import (
    INIT_SOURCES,
    LAST,
    UPDATED,
    grow_vocab,
    init_new_rows,
    update_model,
)

START = date(2026, 1, 1)
WEEKLY_DAYS = 18  # the weekly model sees days 0..17; the update days 18..23 (releases up to day 21)
UPDATE_DAYS = 6


def _config(root: Path, *extra: str) -> Config:
    return load_config(None, [*_args(root), *extra])


def _raw_until(raw: pl.DataFrame, out: Path, lo: date | None, hi: date) -> Path:
    day = pl.col(TS).str.to_datetime(strict=False, time_zone="UTC").dt.date()
    keep = day < hi if lo is None else (day >= lo) & (day < hi)
    raw.filter(keep.fill_null(lo is None)).write_parquet(out)
    return out


def _prepare(config: Config) -> None:
    build_sessions(config)
    split_sessions(config)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("update") / "data"
    config = _config(root)
    generated = generate(config)
    raw = pl.read_parquet(generated["files"])
    weekly_end = START + timedelta(days=WEEKLY_DAYS)
    ingest_files([_raw_until(raw, root / "weekly.parquet", None, weekly_end)], config)
    _prepare(config)
    parent = train_model(config, checkpoint_dir=config.paths.checkpoints_dir / "weekly",
                         evaluate_test=False).best_checkpoint
    later = _raw_until(raw, root / "later.parquet", weekly_end, weekly_end + timedelta(days=UPDATE_DAYS))
    ingest_files([later], config)
    _prepare(config)
    ingest_catalogue(Path(generated["catalogue"]), config)
    as_of = weekly_end + timedelta(days=UPDATE_DAYS)
    return {"config": config, "parent": parent, "root": root, "as_of": as_of, "raw": raw}


def _updated(world, name: str, *extra: str, resume: bool = True):
    config = _config(world["root"], *extra)
    return update_model(config, world["parent"], "version 1", checkpoint_dir=world["root"] / "upd" / name,
                        catalogue=load_catalogue(config), as_of=world["as_of"], resume=resume)


def test_vocabulary_grows_in_order_and_new_rows_start_from_series_genre_or_popularity(world):
    parent = load_checkpoint(world["parent"])
    catalogue = load_catalogue(world["config"])
    known = parent.vocab.item_ids
    series_of = catalogue.select(ITEM_ID, "series_id", "genre", "kind")
    # one unknown episode of a known series, one unknown film of a known genre, one id nobody knows
    cat_known = series_of.filter(pl.col(ITEM_ID).is_in(known.implode()))
    new_episode_series = cat_known.drop_nulls("series_id")["series_id"][0]
    extra = pl.DataFrame({ITEM_ID: [9_000_001, 9_000_002, 9_000_003], "title": ["E", "F", None],
                          "kind": ["series", "film", None], "series_id": [new_episode_series, None, None],
                          "genre": ["drama", "drama", None]}, schema_overrides={"series_id": pl.Int64})
    catalogue = pl.concat([catalogue, extra], how="diagonal_relaxed")
    vocab = grow_vocab(parent.vocab, pl.Series([9_000_001, 9_000_002, 9_000_003, int(known[0])]))
    n_old = len(parent.vocab)
    assert len(vocab) == n_old + 3  # an id already known is not added twice
    assert vocab.item_ids.head(n_old).equals(known)
    assert vocab.frame["idx"].to_list() == list(range(len(vocab)))
    counts = np.zeros(len(vocab), dtype=np.int64)
    counts[:n_old] = np.arange(n_old)  # known items' plays in the window: 0 .. n_old-1
    counts[n_old:] = [5, 5, 5]
    state, source = init_new_rows(parent.model_state, parent.vocab, vocab, counts, catalogue, neighbours=4)
    out, bias = state["item_out"], state["item_bias"]
    assert torch.equal(out[:n_old], parent.model_state["item_out"])  # old rows untouched
    assert torch.equal(bias[:n_old], parent.model_state["item_bias"])
    assert [INIT_SOURCES[s] for s in source] == ["series", "genre", "popularity"]
    rows, biases = parent.model_state["item_out"], parent.model_state["item_bias"]

    def mean_of(ids: pl.Series, table: torch.Tensor = rows) -> torch.Tensor:
        return table[torch.tensor(parent.vocab.index_of(ids))].mean(0)

    idx = cat_known.filter(pl.col("series_id") == new_episode_series)[ITEM_ID]
    assert torch.allclose(out[n_old], mean_of(idx), atol=1e-6)
    genre = cat_known.filter((pl.col("genre") == "drama") & (pl.col("kind") == "film"))[ITEM_ID]
    assert torch.allclose(out[n_old + 1], mean_of(genre), atol=1e-6)
    near = np.argsort(np.log1p(counts[:n_old]), kind="stable")[3:7]  # the 4 known items with ~5 plays
    assert torch.allclose(out[n_old + 2], rows[torch.from_numpy(near)].mean(0), atol=1e-6)
    assert torch.allclose(bias[n_old], mean_of(idx, biases), atol=1e-6)  # an episode: its series' audience
    assert torch.allclose(bias[n_old + 1:], biases[torch.from_numpy(near)].mean(), atol=1e-6)
    # no catalogue at all: every new row is the popularity neighbours' mean
    _, plain = init_new_rows(parent.model_state, parent.vocab, vocab, counts, None, neighbours=4)
    assert set(plain.tolist()) == {INIT_SOURCES.index("popularity")}


def test_update_adds_new_releases_and_keeps_the_parent_order(world):
    result = _updated(world, "plain")
    parent, updated = load_checkpoint(world["parent"]), load_checkpoint(result.checkpoint)
    n_old = len(parent.vocab)
    assert updated.vocab.item_ids.head(n_old).equals(parent.vocab.item_ids)
    assert result.n_new_items > 0 and result.new_sequences > 0 and result.replay_sequences > 0
    catalogue = load_catalogue(world["config"])
    released = catalogue.filter(pl.col("release_date").is_between(
        date.fromisoformat(result.events_up_to[:10]) - timedelta(days=7), world["as_of"]))[ITEM_ID]
    assert released.is_in(updated.vocab.item_ids.implode()).all()  # every fresh release is recommendable
    # every released episode of a series the model knows is in it too (the continuation rule's chain),
    # and nothing released after the run date
    known_series = catalogue.filter(pl.col(ITEM_ID).is_in(updated.vocab.item_ids.implode()))["series_id"]
    siblings = catalogue.filter(pl.col("series_id").is_in(known_series.drop_nulls().implode()),
                                pl.col("release_date") <= world["as_of"])[ITEM_ID]
    assert siblings.is_in(updated.vocab.item_ids.implode()).all()
    future = catalogue.filter(pl.col("release_date") > world["as_of"])[ITEM_ID]
    assert not future.is_in(updated.vocab.item_ids.head(len(updated.vocab)).implode()).any()
    assert result.init_sources["series"] > 0
    # never trained on the test window: the cutoff is the split's
    stats = json.loads((world["config"].paths.split_dir / "stats.json").read_text())
    assert result.events_up_to == datetime.fromisoformat(stats["test_cutoff"]).astimezone(UTC).isoformat()


def test_a_resumed_update_ends_where_an_uninterrupted_one_does(world):
    straight = _updated(world, "straight", "update.epochs=2", resume=False)
    first = _updated(world, "resumed", "update.epochs=1")
    (first.checkpoint).unlink()  # as if killed after epoch 1: only last.pt is left
    assert (first.checkpoint.parent / LAST).exists()
    resumed = _updated(world, "resumed", "update.epochs=2")
    assert resumed.resumed and [h["epoch"] for h in resumed.history] == [1, 2]
    a, b = load_checkpoint(straight.checkpoint).model_state, load_checkpoint(resumed.checkpoint).model_state
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_a_viewer_of_a_new_series_gets_its_next_episode_after_the_update(world):
    """Series the weekly model never saw (released or first watched later): the viewer's next episode is
    in the updated model's top 20 (exclude watched) for most viewers; the weekly model cannot rank it."""
    result = _updated(world, "plain")
    updated, parent = load_checkpoint(result.checkpoint), load_checkpoint(world["parent"])
    catalogue = load_catalogue(world["config"])
    known_series = catalogue.filter(pl.col(ITEM_ID).is_in(parent.vocab.item_ids.implode()))["series_id"]
    new_series = catalogue.filter(pl.col("kind") == "series",
                                  ~pl.col("series_id").is_in(known_series.drop_nulls().implode()))
    events = (pl.read_parquet(list(world["config"].paths.events_dir.rglob("*.parquet"))).sort(USER_ID, TS)
              .join(new_series.select(ITEM_ID, "series_id", "episode"), on=ITEM_ID, how="left"))
    model = build_model(updated)
    ranks = []
    for _, rows in events.group_by(USER_ID, maintain_order=True):
        # the viewer's history up to the last episode of a new series they watched
        watched = rows.with_row_index("pos").drop_nulls("series_id").tail(1)
        if watched.height == 0:
            continue
        pos, series, episode = watched["pos"][0], watched["series_id"][0], watched["episode"][0]
        history = rows.head(pos + 1)
        next_ep = new_series.filter(pl.col("series_id") == series, pl.col("episode") == episode + 1)[ITEM_ID]
        if next_ep.len() == 0 or next_ep[0] in set(history[ITEM_ID].to_list()):
            continue
        assert parent.vocab.index_of(next_ep)[0] < 0
        if updated.vocab.index_of(next_ep)[0] < 0:  # released before the window, too few plays since
            continue
        idx = updated.vocab.index_of(history[ITEM_ID].tail(30))
        idx = torch.from_numpy(idx[idx >= 0])[None, :]  # [1, L]
        with torch.no_grad():
            scores = model.score_items(model.final_states(idx, torch.tensor([idx.shape[1]])))[0]  # [n_items]
        scores[idx[0]] = -float("inf")  # already watched
        target = int(updated.vocab.index_of(next_ep)[0])
        ranks.append(int((scores > scores[target]).sum()) + 1)
    assert len(ranks) >= 30, "the synthetic world should have viewers in the middle of a new series"
    assert np.mean(np.array(ranks) <= 20) >= 0.5, sorted(ranks)


def _registry(config: Config):
    from mlflow import MlflowClient

    from recsys.tracking.store import resolve_tracking_uri

    uri = resolve_tracking_uri(config)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = config.tracking.registered_model
    return client, name


@pytest.fixture(scope="module")
def registered(world):
    """The weekly model registered and promoted: the champion every tracked update starts from."""
    from recsys.tracking.promotion import promote
    from recsys.tracking.runs import register_checkpoint

    config = world["config"]
    register_checkpoint(config, world["parent"])
    assert promote(config).promoted
    client, name = _registry(config)
    return client, name, str(client.get_model_version_by_alias(name, "champion").version)


def test_a_failed_update_leaves_the_champion_and_the_gate_judges_the_next_one(world, registered):
    from recsys.model.step import NonFiniteLossError
    from recsys.tracking.promotion import promote
    from recsys.tracking.update_run import tracked_update

    client, name, champion = registered
    versions = len(client.search_model_versions(f"name = '{name}'"))
    broken = _config(world["root"], "update.run_name=failing", "update.lr_scale=.inf")
    with pytest.raises(NonFiniteLossError):  # diverges in its first epoch
        tracked_update(broken, as_of=world["as_of"])
    assert str(client.get_model_version_by_alias(name, "champion").version) == champion
    assert len(client.search_model_versions(f"name = '{name}'")) == versions  # nothing registered

    config = _config(world["root"], "update.run_name=gated")
    out = tracked_update(config, as_of=world["as_of"])
    assert str(out["parent_version"]) == champion
    assert out["lineage"].startswith(f"updated from version {champion} with events up to ")
    tags = client.get_model_version(name, out["model_version"]).tags
    assert tags["lineage.updated_from"] == out["lineage"]
    assert tracked_update(config, as_of=world["as_of"])["model_version"] == out["model_version"]  # no rerun
    decision = promote(config)  # the same gate as a full training, on the same holdout
    assert decision.challenger_version == out["model_version"] and decision.champion_version == champion
    assert decision.challenger_metrics and decision.champion_metrics and decision.popular_metrics
    assert client.get_model_version(name, out["model_version"]).tags["promotion.decision"] in {
        "promoted", "rejected"}


@pytest.mark.slow
def test_update_killed_with_sigkill_leaves_the_champion_and_resumes(world, registered):
    """A real ``kill -9`` of ``tracked_update`` in another process after its first checkpoint."""
    from recsys.tracking.update_run import tracked_update

    client, name, _ = registered
    champion = str(client.get_model_version_by_alias(name, "champion").version)
    versions = len(client.search_model_versions(f"name = '{name}'"))
    config = _config(world["root"], "update.run_name=killed")
    code = ("import sys, datetime; from recsys.config import load_config; from recsys.tracking.update_run "
            "import tracked_update; tracked_update(load_config(None, sys.argv[2:]), "
            "as_of=datetime.date.fromisoformat(sys.argv[1]))")
    args = [*_args(world["root"]), "update.run_name=killed", "update.epochs=400"]
    proc = subprocess.Popen([sys.executable, "-c", code, world["as_of"].isoformat(), *args],
                            env={**os.environ, "PYTHONPATH": os.getcwd()},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list((config.paths.checkpoints_dir / "killed").rglob(LAST)):
            assert proc.poll() is None and time.monotonic() < deadline, "update never wrote a checkpoint"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert str(client.get_model_version_by_alias(name, "champion").version) == champion
    assert len(client.search_model_versions(f"name = '{name}'")) == versions  # nothing registered
    last = next((config.paths.checkpoints_dir / "killed").rglob(LAST))
    done = load_checkpoint(last).epoch
    assert not (last.parent / UPDATED).exists()
    resumed = _config(world["root"], "update.run_name=killed", f"update.epochs={done + 1}")
    out = tracked_update(resumed, as_of=world["as_of"])
    assert [h["epoch"] for h in out["history"]][-1] == done + 1
    assert str(out["parent_version"]) == champion


def _args(root: Path) -> list[str]:
    return [f"paths.data_root={root}", "generate.n_events=50000", "generate.days=28", "generate.seed=3",
            "generate.new_release_fraction=0.3", "model.hidden_size=24", "train.epochs=3",
            "train.batch_size=32", "train.n_sample=64", "train.device=cpu", "split.test_days=1",
            "split.valid_days=2", "split.test_fraction=null", "tracking.system_metrics=false",
            "evaluate.knn_neighbours=20",
            f"tracking.tracking_uri=sqlite:///{(root / 'mlflow' / 'mlflow.db').resolve()}",
            "tracking.retry_window_seconds=1", "tracking.retry_backoff_seconds=0.05"]


def test_parent_weight_averages_shared_weights_and_keeps_new_rows_as_tuned():
    from recsys.training.update import blend_with_parent

    parent = {"item_out": torch.zeros(3, 2), "item_bias": torch.zeros(3), "layers.0.w_hh": torch.zeros(2, 2)}
    tuned = {"item_out": torch.ones(5, 2), "item_bias": torch.ones(5), "layers.0.w_hh": torch.ones(2, 2)}
    out = blend_with_parent(tuned, parent, 0.25)
    assert torch.equal(out["item_out"][:3], torch.full((3, 2), 0.75))  # old rows: 0.25 parent + 0.75 tuned
    assert torch.equal(out["item_out"][3:], torch.ones(2, 2))  # new rows: as tuned
    assert torch.equal(out["item_bias"], torch.tensor([0.75, 0.75, 0.75, 1.0, 1.0]))
    assert torch.equal(out["layers.0.w_hh"], torch.full((2, 2), 0.75))
