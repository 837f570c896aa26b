"""Batch scoring on a tiny world: results equal a one-user-at-a-time computation, exclusions, fallback,
unknown items/users, users file, export variants. The checkpoint is a random GRU4Rec saved with the real
``save_checkpoint`` and loaded through ``registry.resolve_model`` (local path)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest
import torch
from score_fixtures import KNOWN_ITEMS, RUN_DATE, make_events, make_world

from recsys.schemas import ITEM_ID, MANIFEST_FILE, RANK, SCORE, SOURCE, TS, USER_ID
from recsys.serving.export import complete_partitions, partition_dir, read_recs
from recsys.serving.score import score_users


def reference_recs(world, *, top_k, max_history, exclude_seen=True, excluded=(), history_days=None):
    """The straightforward way: one user at a time, plain Python lists, model.final_states on [1, L]."""
    cutoff = datetime(RUN_DATE.year, RUN_DATE.month, RUN_DATE.day, tzinfo=UTC) + timedelta(days=1)
    start = cutoff - timedelta(days=history_days) if history_days else None
    index = dict(zip(world.vocab.item_ids.to_list(), range(len(world.vocab)), strict=True))
    events = make_events().filter(pl.col(TS) < cutoff).sort(USER_ID, TS, maintain_order=True)
    out = {}
    for (user,), frame in events.group_by(USER_ID, maintain_order=True):
        items, times = frame[ITEM_ID].to_list(), frame[TS].to_list()
        window = [i for i, t in zip(items, times, strict=True) if start is None or t >= start]
        window = [i for n, i in enumerate(window) if n == 0 or window[n - 1] != i]  # consecutive repeats
        history = [index[i] for i in window if i in index][-max_history:]
        scores = torch.tensor(world.vocab.counts, dtype=torch.float32)  # popular fallback
        source = "popular"
        if history:
            with torch.no_grad():
                state = world.model.final_states(torch.tensor([history]), torch.tensor([len(history)]))
                scores = world.model.score_items(state)[0]
            source = "model"
        for item in excluded:
            if item in index:
                scores[index[item]] = -torch.inf
        watched = {index[i] for i in items if i in index}
        if exclude_seen:
            scores[sorted(watched)] = -torch.inf
        elif world.model.history_bias is not None and source == "model":
            scores[sorted(watched)] += world.model.history_bias.item()  # once per watched item
        vals, idx = torch.topk(scores, top_k)
        keep = torch.isfinite(vals)
        out[user] = (world.vocab.item_ids.gather(idx[keep].numpy()).to_list(), vals[keep].numpy(), source)
    return out


def as_dict(recs: pl.DataFrame) -> dict:
    out = {}
    for (user,), frame in recs.sort(USER_ID, RANK).group_by(USER_ID, maintain_order=True):
        out[user] = (frame[ITEM_ID].to_list(), frame[SCORE].to_numpy(), frame[SOURCE][0])
    return out


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for user in want:
        assert got[user][0] == want[user][0], f"user {user}"
        np.testing.assert_allclose(got[user][1], want[user][1], rtol=1e-5, atol=1e-6)
        assert got[user][2] == want[user][2], f"user {user}"


@pytest.mark.parametrize("batch, chunk", [(4096, None), (2, 40)])  # one batch / many batches and chunks
def test_scores_equal_per_user_computation(tmp_path, batch, chunk):
    world = make_world(tmp_path, score={"user_batch_size": batch, "chunk_elements": chunk})
    manifest = score_users(world.config, model_uri=str(world.checkpoint), run_date=RUN_DATE)
    recs = read_recs(world.exports_dir, RUN_DATE).collect()
    assert_same(as_dict(recs), reference_recs(world, top_k=5, max_history=10))
    assert manifest["counts"]["users_scored"] == 6  # users 1-5 and 7; user 6 starts after the run date
    assert manifest["counts"]["history_items_truncated"] > 0  # user 2 has 40 events, max_history 10


def test_round_trip_contract_and_manifest(tmp_path):
    world = make_world(tmp_path)
    manifest = score_users(world.config, model_uri=str(world.checkpoint), run_date=RUN_DATE)
    part = partition_dir(world.exports_dir, RUN_DATE)
    on_disk = json.loads((part / MANIFEST_FILE).read_text())
    assert on_disk["counts"] == manifest["counts"]
    assert on_disk["model"]["name"] == "local" and len(on_disk["model"]["version"]) == 12
    assert len(on_disk["input"]["snapshot_hash"]) == 64
    assert {"history_s", "encode_s", "score_s", "validate_s", "write_s"} <= on_disk["timings"].keys()
    # a reader globbing the hive layout gets the contract's columns and types
    recs = pl.scan_parquet(str(world.exports_dir / "recs" / "run_date=*" / "*.parquet"),
                           hive_partitioning=True).collect()
    assert recs.schema == pl.Schema({
        USER_ID: pl.Int64, RANK: pl.Int16, ITEM_ID: pl.Int64, SCORE: pl.Float32, SOURCE: pl.String,
        "model_name": pl.String, "model_version": pl.String, "run_date": pl.Date,
    })
    assert recs["run_date"].unique().to_list() == [RUN_DATE]
    assert recs.height == on_disk["rows"] == 6 * 5
    ranks = recs.group_by(USER_ID).agg(pl.col(RANK).sort()).sort(USER_ID)[RANK].to_list()
    assert ranks == [[1, 2, 3, 4, 5]] * 6


def test_exclusions_seen_and_withdrawn_list(tmp_path):
    exclude = tmp_path / "withdrawn.txt"
    exclude.write_text("100\n104\n 127 \n999\n\n")  # 999 is unknown to the model
    world = make_world(tmp_path, score={"exclude_items_file": str(exclude)})
    manifest = score_users(world.config, model_uri=str(world.checkpoint), run_date=RUN_DATE)
    recs = read_recs(world.exports_dir, RUN_DATE).collect()
    assert not recs.filter(pl.col(ITEM_ID).is_in([100, 104, 127])).height
    watched = make_events().select(USER_ID, ITEM_ID)
    assert not recs.join(watched, on=[USER_ID, ITEM_ID], how="semi").height
    assert manifest["counts"]["excluded_items"] == 3 and manifest["counts"]["excluded_items_unknown"] == 1
    want = reference_recs(world, top_k=5, max_history=10, excluded=[100, 104, 127])
    assert_same(as_dict(recs), want)
    assert want[3][0] == [101, 102, 103, 105, 106]  # popular list minus the withdrawn items


def test_exclude_seen_off_keeps_watched_items(tmp_path):
    world = make_world(tmp_path, score={"top_k": 30}, exclude="none")
    score_users(world.config, model_uri=str(world.checkpoint), run_date=RUN_DATE)
    recs = read_recs(world.exports_dir, RUN_DATE).collect()
    assert_same(as_dict(recs), reference_recs(world, top_k=30, max_history=10, exclude_seen=False))
    assert recs.filter(pl.col(USER_ID) == 1)[ITEM_ID].is_in([100, 103, 107, 101]).sum() == 4


@pytest.mark.parametrize("bias", [-50.0, 50.0])
def test_learned_history_bias_moves_watched_items_when_they_are_not_excluded(tmp_path, bias):
    world = make_world(tmp_path, score={"top_k": 8}, history_bias=bias, exclude="none")
    score_users(world.config, model_uri=str(world.checkpoint), run_date=RUN_DATE)
    recs = read_recs(world.exports_dir, RUN_DATE).collect()
    assert_same(as_dict(recs), reference_recs(world, top_k=8, max_history=10, exclude_seen=False))
    watched = recs.filter(pl.col(SOURCE) == "model").join(
        make_events().select(USER_ID, ITEM_ID).unique(), on=[USER_ID, ITEM_ID], how="semi"
    )
    if bias < 0:  # watched items sink below every unwatched one
        assert watched.height == 0
    else:  # user 1 watched 4 known items: they now lead the list
        first = recs.filter(pl.col(USER_ID) == 1).sort(RANK)[ITEM_ID].to_list()[:4]
        assert sorted(first) == [100, 101, 103, 107]


def test_popular_fallback_and_unknown_items(tmp_path):
    world = make_world(tmp_path, score={"history_days": 15})
    manifest = score_users(world.config, model_uri=str(world.checkpoint), run_date=RUN_DATE)
    recs = as_dict(read_recs(world.exports_dir, RUN_DATE).collect())
    # 3: only unknown items; 5 and 7: no event in the 15-day window
    assert {u for u, r in recs.items() if r[2] == "popular"} == {3, 5, 7}
    assert recs[3][0] == KNOWN_ITEMS[:5]
    assert recs[7][0] == KNOWN_ITEMS[1:6]  # watched the most popular item long ago: still excluded
    assert recs[3][1].tolist() == [40.0, 39.0, 38.0, 37.0, 36.0]  # popular score = training count
    counts = manifest["counts"]
    assert counts["users_popular"] == 3 and counts["users_model"] == 3
    assert counts["unknown_item_events"] == 3 and counts["unknown_items"] == 2  # 900 twice, 901 once
    assert_same(recs, reference_recs(world, top_k=5, max_history=10, history_days=15))


@pytest.mark.parametrize("kind", ["txt", "parquet", "csv"])
def test_users_file_scores_only_those_users(tmp_path, kind):
    world = make_world(tmp_path)
    ids = [4, 1, 42, 1]  # 42 has no events; 1 is repeated
    path = tmp_path / f"users.{kind}"
    if kind == "txt":
        path.write_text("\n".join(map(str, ids)) + "\n")
    else:
        frame = pl.DataFrame({USER_ID: ids})
        frame.write_parquet(path) if kind == "parquet" else frame.write_csv(path)
    manifest = score_users(world.config, model_uri=str(world.checkpoint), run_date=RUN_DATE, users_file=path)
    frame = read_recs(world.exports_dir, RUN_DATE).collect()
    assert frame[USER_ID].is_sorted()  # the user without events is not left at the end
    recs = as_dict(frame)
    assert set(recs) == {1, 4, 42}
    assert recs[42][2] == "popular" and recs[42][0] == KNOWN_ITEMS[:5]
    full = reference_recs(world, top_k=5, max_history=10)
    assert_same({u: recs[u] for u in (1, 4)}, {u: full[u] for u in (1, 4)})
    assert manifest["counts"]["unknown_users"] == 1 and manifest["counts"]["users_requested"] == 3


def test_users_file_with_ids_of_the_wrong_type_fails(tmp_path):
    world = make_world(tmp_path)
    path = tmp_path / "users.txt"
    path.write_text("1\nabc\n")
    with pytest.raises(ValueError, match="abc"):
        score_users(world.config, model_uri=str(world.checkpoint), run_date=RUN_DATE, users_file=path)
    assert not complete_partitions(world.exports_dir)


def test_csv_and_wide_variants_and_rerun_replaces(tmp_path):
    world = make_world(tmp_path, score={"write_csv": True, "write_wide": True})
    score_users(world.config, model_uri=str(world.checkpoint), run_date=RUN_DATE)
    first = read_recs(world.exports_dir, RUN_DATE).collect()
    wide = pl.read_parquet(partition_dir(world.exports_dir, RUN_DATE, "recs_wide") / "part-0.parquet")
    assert wide.height == 6 and wide.filter(pl.col(USER_ID) == 1)["item_ids"].to_list()[0] == \
        first.filter(pl.col(USER_ID) == 1)[ITEM_ID].to_list()
    csv = pl.read_csv(partition_dir(world.exports_dir, RUN_DATE, "recs_csv") / "recs.csv")
    assert csv.height == first.height
    # a new model for the same date replaces the whole partition
    other = make_world(tmp_path / "other", seed=1)
    score_users(world.config, model_uri=str(other.checkpoint), run_date=RUN_DATE)
    second = read_recs(world.exports_dir, RUN_DATE).collect()
    assert second["model_version"].unique().to_list() != first["model_version"].unique().to_list()
    assert second.height == first.height
    assert not list((world.exports_dir / "_staging").iterdir())


def test_popular_scores_are_the_counts_when_model_knows_nothing(tmp_path):
    world = make_world(tmp_path)
    users = tmp_path / "u.txt"
    users.write_text("3\n")
    score_users(world.config, model_uri=str(world.checkpoint), run_date=RUN_DATE, users_file=users)
    recs = read_recs(world.exports_dir, RUN_DATE).collect()
    assert recs[SOURCE].to_list() == ["popular"] * 5
    assert recs[SCORE].to_list() == [40.0, 39.0, 38.0, 37.0, 36.0]


def test_bfloat16_precision_and_threads_setting(tmp_path):
    world = make_world(tmp_path, score={"precision": "bfloat16", "threads": 1})
    before = torch.get_num_threads()
    manifest = score_users(world.config, model_uri=str(world.checkpoint), run_date=RUN_DATE)
    assert torch.get_num_threads() == before and manifest["torch_threads"] == 1
    got = as_dict(read_recs(world.exports_dir, RUN_DATE).collect())
    want = reference_recs(world, top_k=5, max_history=10)
    assert got.keys() == want.keys()
    overlap = np.mean([len(set(got[u][0]) & set(want[u][0])) / 5 for u in want])
    assert overlap >= 0.8  # bf16 rounding may swap near-tied items only


@pytest.mark.parametrize("n, k", [(5000, 20), (4103, 7), (300, 20), (2560, 10)])
def test_block_topk_equals_torch_topk(n, k):
    from recsys.serving.score import block_topk

    g = torch.Generator().manual_seed(n)
    scores = torch.randn(33, n, generator=g)
    scores[0, : n - 3] = -torch.inf  # fewer finite scores than k
    scores[1] = -torch.inf
    scores[2, 100:] = -torch.inf  # all the best in the first blocks
    scores[3, :-5] -= 100  # all the best in the ragged tail
    vals, idx = block_topk(scores, k)
    want_vals, want_idx = torch.topk(scores, k, dim=1)
    assert torch.equal(vals, want_vals)
    finite = torch.isfinite(want_vals)
    assert torch.equal(idx[finite], want_idx[finite])


def test_run_date_before_all_events_fails_clearly(tmp_path):
    world = make_world(tmp_path)
    with pytest.raises(ValueError, match="no user to score"):
        score_users(world.config, model_uri=str(world.checkpoint), run_date=RUN_DATE - timedelta(days=200))
    assert not complete_partitions(world.exports_dir)


def test_champion_by_default_and_registry_name_version_in_export(tmp_path, monkeypatch):
    import recsys.tracking.registry as registry

    world = make_world(tmp_path)
    asked = []

    def fake_resolve(config, model_uri):
        asked.append(model_uri)
        return registry.ResolvedModel(world.checkpoint, name="recsys-gru4rec", version="7", run_id="r1",
                                      uri=model_uri)

    monkeypatch.setattr(registry, "resolve_model", fake_resolve)
    manifest = score_users(world.config, run_date=RUN_DATE)
    assert asked == ["models:/recsys-gru4rec@champion"]
    recs = read_recs(world.exports_dir, RUN_DATE).collect()
    assert recs["model_name"].unique().to_list() == ["recsys-gru4rec"]
    assert recs["model_version"].unique().to_list() == ["7"]
    assert manifest["model"]["run_id"] == "r1"
    assert manifest["model"]["uri"] == "models:/recsys-gru4rec@champion"


def test_printed_sample_lists_show_titles_when_a_catalogue_is_known(tmp_path):
    """`recsys score` prints a few users' lists: titles from the export's title column or the catalogue,
    the id where neither knows the item."""
    from rich.console import Console

    from recsys.serving.report import sample_table

    recs = pl.DataFrame({USER_ID: [1, 1, 2], RANK: [1, 2, 1], ITEM_ID: [10, 11, 10],
                         SCORE: [0.9, 0.5, 0.7], SOURCE: ["model"] * 3})
    titles = pl.DataFrame({ITEM_ID: [10], "title": ["The Silent Harbor S01E02"]})
    (tmp_path / "plain").mkdir()
    recs.write_parquet(tmp_path / "plain" / "part-0.parquet")
    (tmp_path / "titled").mkdir()
    recs.with_columns(pl.when(pl.col(ITEM_ID) == 10).then(pl.lit("The Silent Harbor S01E02"))
                      .alias("title")).write_parquet(tmp_path / "titled" / "part-0.parquet")
    for folder, known in (("plain", titles), ("titled", None)):
        console = Console(record=True, width=200)
        console.print(sample_table(tmp_path / folder, titles=known))
        text = console.export_text()
        assert "The Silent Harbor S01E02 (0.9)" in text and "11 (0.5)" in text, text
    console = Console(record=True, width=200)
    console.print(sample_table(tmp_path / "plain"))
    assert "10 (0.9)" in console.export_text()  # no catalogue: ids


def test_titles_come_from_the_ingested_catalogue_else_the_one_the_policy_reads(tmp_path):
    from recsys.config import load_config
    from recsys.serving.score import catalogue_titles

    config = load_config(overrides=[f"paths.data_root={tmp_path}"])
    assert catalogue_titles(config) is None  # no catalogue anywhere: ids are shown
    raw = config.paths.raw_dir / "synthetic"
    raw.mkdir(parents=True)
    pl.DataFrame({ITEM_ID: [10], "title": ["Raw Title"]}).write_parquet(raw / "catalogue.parquet")
    assert catalogue_titles(config).rows() == [(10, "Raw Title")]  # the generator's, not yet ingested
    config.paths.catalogue_file.parent.mkdir(parents=True)
    pl.DataFrame({ITEM_ID: [10], "title": ["Ingested"]}).write_parquet(config.paths.catalogue_file)
    assert catalogue_titles(config).rows() == [(10, "Ingested")]
