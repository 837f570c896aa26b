"""Most-popular and item-kNN baselines on a tiny hand-made session set with hand-computed similarities."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from recsys.config import Config
from recsys.data.sequences import SequenceSet
from recsys.training.baselines import ItemKNN, MostPopular, fit_baselines
from recsys.training.evaluate import Recommender, evaluate_recommender


def make_seqs(seqs: list[list[int]], n_context: list[int] | None = None) -> SequenceSet:
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = np.array([i for s in seqs for i in s], dtype=np.int64)
    ctx = np.array(n_context if n_context is not None else [0] * len(seqs), dtype=np.int64)
    return SequenceSet(items, offsets, ctx, pl.Series("user_id", list(range(len(seqs)))), {})


# Sessions as item sets: {0,1,2} {0,1} {1,3} {0,2} (the repeat of 2 counts once); item 4 never occurs.
TRAIN = [[0, 1, 2], [0, 1], [1, 3], [2, 0, 2]]
N_ITEMS = 5
# sequences containing each item: 0:3 1:3 2:2 3:1 4:0; co-occurring: (0,1):2 (0,2):2 (1,2):1 (1,3):1


def expected_similarity(lam: float) -> np.ndarray:
    cnt = [3, 3, 2, 1, 0]
    cooc = {(0, 1): 2, (0, 2): 2, (1, 2): 1, (1, 3): 1}
    sim = np.zeros((N_ITEMS, N_ITEMS))
    for (i, j), c in cooc.items():
        sim[i, j] = sim[j, i] = c / (math.sqrt(cnt[i] * cnt[j]) + lam)
    return sim


def dense(knn: ItemKNN) -> np.ndarray:
    return knn.score(torch.arange(N_ITEMS)[:, None]).numpy()  # row i = scores given last item i


def test_most_popular_scores_training_counts_and_ignores_history():
    pop = MostPopular.fit(make_seqs(TRAIN), N_ITEMS)
    assert isinstance(pop, Recommender)
    test = make_seqs([[3, 1, 0], [2, 0]], n_context=[1, 1])
    states = pop.encode_queries(test)
    assert states.shape == (3, 1)
    assert pop.score(states).tolist() == [[3, 3, 3, 1, 0]] * 3  # event counts, repeats included
    m = evaluate_recommender(pop, test, cutoffs=(1, 2, 3), exclude_seen=False, chunk_size=2)
    # targets 1, 0, 0: each tied with two others at the top -> rank 3
    assert m["recall@2"] == 0.0
    assert m["recall@3"] == 1.0
    assert m["mrr@3"] == pytest.approx(1 / 3)
    masked = evaluate_recommender(pop, test, cutoffs=(1, 2, 3), exclude_seen=True, chunk_size=2)
    # histories {3}, {3, 1}, {2}: ranks 3, 2, 2
    assert masked["mrr@3"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)


def test_item_knn_hand_computed_cosine_with_shrinkage():
    knn = ItemKNN.fit(make_seqs(TRAIN), N_ITEMS, neighbours=N_ITEMS, lam=1.0)
    assert isinstance(knn, Recommender)
    np.testing.assert_allclose(dense(knn), expected_similarity(1.0), rtol=1e-6)
    assert dense(knn)[0, 1] == pytest.approx(2 / 4)  # 2 / (sqrt(3 * 3) + 1)
    no_shrink = ItemKNN.fit(make_seqs(TRAIN), N_ITEMS, neighbours=N_ITEMS, lam=0.0)
    np.testing.assert_allclose(dense(no_shrink), expected_similarity(0.0), rtol=1e-6)


def test_item_knn_keeps_only_top_neighbours():
    knn = ItemKNN.fit(make_seqs(TRAIN), N_ITEMS, neighbours=2, lam=1.0)
    sim = expected_similarity(1.0)
    scores = dense(knn)
    # item 1's neighbours: 0 (2/4) and 3 (1/(sqrt 3 + 1)); item 2 (1/(sqrt 6 + 1)) is cut
    np.testing.assert_allclose(scores[1], [sim[1, 0], 0, 0, sim[1, 3], 0], rtol=1e-6)
    np.testing.assert_allclose(scores[0], [0, sim[0, 1], sim[0, 2], 0, 0], rtol=1e-6)
    assert not scores[4].any()


def test_item_knn_blocking_does_not_change_the_result():
    default = ItemKNN.fit(make_seqs(TRAIN), N_ITEMS, neighbours=3, lam=0.5)
    tiny_blocks = ItemKNN.fit(make_seqs(TRAIN), N_ITEMS, neighbours=3, lam=0.5, pair_budget=1)
    np.testing.assert_array_equal(dense(default), dense(tiny_blocks))


def test_item_knn_caps_long_sequences_to_their_last_items():
    knn = ItemKNN.fit(make_seqs([[0, 1, 2, 3]]), 4, neighbours=4, lam=0.0, max_session_items=2)
    scores = dense_n(knn, 4)
    assert not scores[0].any() and not scores[1].any()  # items 0 and 1 were cut from the sequence
    assert scores[2, 3] == pytest.approx(1.0)


def dense_n(knn: ItemKNN, n: int) -> np.ndarray:
    return knn.score(torch.arange(n)[:, None]).numpy()


def test_item_knn_state_is_last_item_and_ranks_targets():
    knn = ItemKNN.fit(make_seqs(TRAIN), N_ITEMS, neighbours=2, lam=1.0)
    test = make_seqs([[4, 1, 3]], n_context=[2])  # one query: last item 1, target 3
    assert knn.encode_queries(test).tolist() == [[1]]
    m = evaluate_recommender(knn, test, cutoffs=(1, 2), exclude_seen=False, chunk_size=1)
    assert m["recall@1"] == 0.0 and m["recall@2"] == 1.0  # 3 ranks behind 0


def test_fit_baselines_uses_configured_knn_settings():
    config = Config()
    config.evaluate.knn_neighbours = 1
    config.evaluate.knn_lambda = 0.0
    models = fit_baselines(config, make_seqs(TRAIN), N_ITEMS)
    assert list(models) == ["item-knn", "most-popular"]
    assert models["item-knn"].neighbours.shape == (N_ITEMS, 1)
    assert models["item-knn"].neighbours[0].tolist() == [2]  # 2 / sqrt(6) beats 2 / 3


def test_item_knn_equal_similarities_keep_the_lower_index():
    knn = ItemKNN.fit(make_seqs([[0, 2], [0, 1]]), 3, neighbours=1, lam=0.0)
    assert knn.neighbours[0].tolist() == [1]  # sim(0, 1) == sim(0, 2) == 1 / sqrt(2)
    assert knn.similarities[0].tolist() == [pytest.approx(1 / math.sqrt(2))]
