"""Slices over every test target, from the evaluator's per-query ranks (real split files, real baselines)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from model_data import cyclic_sequences, write_split_dir

from recsys.config import load_config
from recsys.data.vocab import Vocab
from recsys.training.evaluate import evaluate_all
from recsys.training.slices import per_target, ranks_over_targets, slices_of_models, target_table


@pytest.fixture()
def split_with_new_items(tmp_path):
    """The tiny leave-one-out split, with the last test item of every 4th user replaced by a new item and
    one user who never appears in training (cold)."""
    split = write_split_dir(tmp_path / "split", cyclic_sequences(n_seq=40))
    test = pl.read_parquet(split / "test.parquet")
    items = [s[:-1] + [999] if i % 4 == 0 else s for i, s in enumerate(test["items"].to_list())]
    cold = pl.DataFrame({"user_id": ["newcomer"], "items": [items[1][:3]], "n_context": [1]},
                        schema=test.schema)
    pl.concat([test.with_columns(pl.Series("items", items, dtype=test.schema["items"])), cold]).write_parquet(
        split / "test.parquet")
    return split


def test_ranks_map_onto_every_target_and_unrankable_ones_are_misses(tmp_path, split_with_new_items):
    config = load_config(overrides=[f"paths.data_root={tmp_path}", "evaluate.knn_neighbours=5"])
    ranks: dict[str, np.ndarray] = {}
    rows = evaluate_all(config, split_with_new_items, {}, ranks=ranks)
    vocab = Vocab.load(split_with_new_items / "vocab.parquet")
    table = target_table(config, split_with_new_items, "test.parquet")
    assert table.n_targets == 40 + 2  # one per user, two for the cold user's three items
    assert table.slices["item:new"].sum() == 10 and table.slices["user:cold"].sum() == 2
    for name, query_ranks in ranks.items():
        assert len(query_ranks) == rows[name]["n_queries"] == 32
        over_targets = ranks_over_targets(table, vocab, query_ranks)
        assert (over_targets[table.slices["item:new"]] == 0).all()  # never ranked: misses
        # the mean over all targets is the evaluator's figure: every metric is over all targets
        assert per_target(over_targets, "recall").mean() == pytest.approx(rows[name]["recall@20"])
        assert per_target(over_targets, "mrr").mean() == pytest.approx(rows[name]["mrr@20"])
    report = slices_of_models(config, split_with_new_items, "test.parquet", ranks, vocab)
    popular = report["models"]["most-popular"]
    assert popular["item:new"]["mrr@20"] == 0.0 and popular["item:new"]["n"] == 10
    assert popular["all"]["n"] == 42 and report["slices"][0] == "all"


def test_catalogue_kind_slices(tmp_path, split_with_new_items):
    catalogue = tmp_path / "raw" / "synthetic" / "catalogue.parquet"
    catalogue.parent.mkdir(parents=True)
    kinds = ["series"] * 20 + ["film"] * 10
    pl.DataFrame({"item_id": list(range(30)), "kind": kinds}).write_parquet(catalogue)
    config = load_config(overrides=[f"paths.data_root={tmp_path}"])
    table = target_table(config, split_with_new_items, "test.parquet")
    assert {"kind:series", "kind:film"} <= set(table.slices)
    assert (table.slices["kind:series"] | table.slices["kind:film"] | table.slices["item:new"]).all()
