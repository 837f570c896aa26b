"""Full-catalogue evaluation: hand-computed metrics, conservative ties, masking, chunk-size invariance."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.config import Config
from recsys.data.sequences import SequenceSet
from recsys.data.vocab import Vocab
from recsys.training.evaluate import (
    HistoryAware,
    Recommender,
    canonical_topk,
    count_at_least,
    evaluate_all,
    evaluate_recommender,
    history_pairs,
    target_line,
)


def make_seqs(seqs: list[list[int]], n_context: list[int] | None = None,
              dropped: dict[str, int] | None = None) -> SequenceSet:
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = np.array([i for s in seqs for i in s], dtype=np.int64)
    ctx = np.array(n_context if n_context is not None else [0] * len(seqs), dtype=np.int64)
    return SequenceSet(items, offsets, ctx, pl.Series("user_id", list(range(len(seqs)))), dropped or {})


class FixedScores:
    """Test recommender: query q gets row q of a fixed score matrix."""

    name = "fixed"

    def __init__(self, scores: list[list[float]] | np.ndarray):
        self.matrix = torch.as_tensor(np.asarray(scores, dtype=np.float32))
        self.n_items = self.matrix.shape[1]

    def encode_queries(self, seqs: SequenceSet) -> torch.Tensor:
        return torch.arange(len(seqs.queries()[0]))[:, None]  # [Q, 1]

    def score(self, states: torch.Tensor) -> torch.Tensor:
        return self.matrix[states[:, 0]]  # [b, n]: advanced indexing gives a fresh tensor


# seq A = [0, 1, 2], seq B = [3, 0] -> queries: (A,1) target 1 | (A,2) target 2 | (B,1) target 0
THREE_QUERIES = [[0, 1, 2], [3, 0]]
THREE_SCORES = [
    [9, 5, 7, 1, 0],  # target 1: items 0, 2 score higher -> rank 3 (rank 2 once item 0 is masked)
    [1, 1, 1, 1, 1],  # all tied -> rank 5 (rank 3 once items 0, 1 are masked)
    [4, 3, 2, 1, 0],  # target 0 -> rank 1
]
POPULARITY = np.array([10, 20, 30, 40, 50])


def test_fixed_scores_satisfies_protocol():
    assert isinstance(FixedScores([[0.0]]), Recommender)


def test_single_query_tied_with_two_others_ranks_third():
    seqs = make_seqs([[0, 1]])
    rec = FixedScores([[0.5, 0.9, 0.9, 0.9, 0.1, 0.2]])
    m = evaluate_recommender(rec, seqs, cutoffs=(1, 2, 3, 5), exclude_seen=False, chunk_size=4)
    assert m["recall@2"] == 0.0
    assert m["recall@3"] == 1.0
    assert m["mrr@3"] == pytest.approx(1 / 3)
    assert m["ndcg@3"] == pytest.approx(0.5)  # 1 / log2(3 + 1)
    assert m["ndcg@5"] == pytest.approx(0.5)
    assert m["n_queries"] == 1


def test_hand_computed_metrics_without_masking():
    m = evaluate_recommender(FixedScores(THREE_SCORES), make_seqs(THREE_QUERIES), cutoffs=(1, 2, 3),
                             exclude_seen=False, chunk_size=2, item_popularity=POPULARITY)
    # ranks [3, 5, 1]
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@2"] == pytest.approx(1 / 3)
    assert m["recall@3"] == pytest.approx(2 / 3)
    assert m["mrr@3"] == pytest.approx((1 / 3 + 1) / 3)
    assert m["ndcg@3"] == pytest.approx((0.5 + 1) / 3)
    # top lists, ties to the lower index: q0 [0, 2, 1], q1 [0, 1, 2], q2 [0, 1, 2]
    assert m["coverage@1"] == pytest.approx(1 / 5)
    assert m["coverage@2"] == pytest.approx(3 / 5)
    assert m["coverage@3"] == pytest.approx(3 / 5)
    assert m["popularity@1"] == pytest.approx(10)
    assert m["popularity@2"] == pytest.approx((10 + 30 + 10 + 20 + 10 + 20) / 6)
    assert m["popularity@3"] == pytest.approx(20)


def test_hand_computed_metrics_with_exclude_seen():
    m = evaluate_recommender(FixedScores(THREE_SCORES), make_seqs(THREE_QUERIES), cutoffs=(1, 2, 3),
                             exclude_seen=True, chunk_size=1, item_popularity=POPULARITY)
    # histories {0}, {0, 1}, {3} masked -> ranks [2, 3, 1]
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@2"] == pytest.approx(2 / 3)
    assert m["recall@3"] == pytest.approx(1.0)
    assert m["mrr@2"] == pytest.approx((1 / 2 + 1) / 3)
    assert m["mrr@3"] == pytest.approx((1 / 2 + 1 / 3 + 1) / 3)
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3) + 1) / 3)
    # top lists: q0 [2, 1, 3], q1 [2, 3, 4], q2 [0, 1, 2]
    assert m["coverage@1"] == pytest.approx(2 / 5)
    assert m["coverage@2"] == pytest.approx(4 / 5)
    assert m["coverage@3"] == pytest.approx(1.0)
    assert m["popularity@1"] == pytest.approx((30 + 30 + 10) / 3)


def test_target_in_its_own_history_is_a_miss_when_masked():
    seqs = make_seqs([[0, 1, 0]], n_context=[2])  # one query: target 0, history [0, 1]
    rec = FixedScores([[5.0, 1.0, 0.0]])
    assert evaluate_recommender(rec, seqs, cutoffs=(3,), exclude_seen=False, chunk_size=8)["recall@3"] == 1
    assert evaluate_recommender(rec, seqs, cutoffs=(3,), exclude_seen=True, chunk_size=8)["recall@3"] == 0


class FixedScoresWithHistoryBias(FixedScores):
    """FixedScores plus a constant added to each history item once (a learned repeat offset)."""

    uses_history = True

    def __init__(self, scores, bias: float):
        super().__init__(scores)
        self.bias = bias

    def add_history_bias(self, scores: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> None:
        scores[rows, cols] = scores[rows, cols] + self.bias


@pytest.mark.parametrize("chunk_size", [1, 2, 8])
def test_history_bias_moves_history_items_once_and_only_when_not_masked(chunk_size):
    rec = FixedScoresWithHistoryBias(THREE_SCORES, bias=-4.5)
    assert isinstance(rec, HistoryAware) and not isinstance(FixedScores([[0.0]]), HistoryAware)
    m = evaluate_recommender(rec, make_seqs(THREE_QUERIES), cutoffs=(1, 2, 3), exclude_seen=False,
                             chunk_size=chunk_size)
    # q0: item 0 (history) 9 -> 4.5, target 1 (5) beaten only by item 2 (7) -> rank 2
    # q1: items 0, 1 (history) 1 -> -3.5, target 2 tied with items 3, 4 at 1 -> rank 3
    # q2: item 3 (history) 1 -> -3.5, target 0 (4) -> rank 1
    assert m["mrr@3"] == pytest.approx((1 / 2 + 1 / 3 + 1) / 3)
    assert m["recall@1"] == pytest.approx(1 / 3) and m["recall@2"] == pytest.approx(2 / 3)
    # a repeated history item ([0, 0, 1]: query target 1, history {0}) is offset once, not twice
    once = evaluate_recommender(FixedScoresWithHistoryBias([[6.0, 2.0, 1.5]], bias=-3.0),
                                make_seqs([[0, 0, 1]], n_context=[2]), cutoffs=(1, 2), exclude_seen=False,
                                chunk_size=chunk_size)
    assert once["recall@1"] == 0.0 and once["recall@2"] == 1.0  # 6 - 3 = 3 > 2 (twice would be 0 < 2)
    boosted = FixedScoresWithHistoryBias(THREE_SCORES, bias=100.0)  # history would rank first ...
    m = evaluate_recommender(boosted, make_seqs(THREE_QUERIES), cutoffs=(1, 2, 3), exclude_seen=False,
                             chunk_size=chunk_size)
    assert m["recall@1"] == pytest.approx(0.0)  # q0, q1 lose rank 1 to history; q2 item 3 goes to 101
    masked = evaluate_recommender(boosted, make_seqs(THREE_QUERIES), cutoffs=(1, 2, 3), exclude_seen=True,
                                  chunk_size=chunk_size)
    assert masked["mrr@3"] == pytest.approx((1 / 2 + 1 / 3 + 1) / 3)  # ... but masking wins: ranks [2, 3, 1]
    boosted.uses_history = False  # a model without a learnt bias: scores as they are, ranks [3, 5, 1]
    m = evaluate_recommender(boosted, make_seqs(THREE_QUERIES), cutoffs=(1, 2, 3), exclude_seen=False,
                             chunk_size=chunk_size)
    assert m["mrr@3"] == pytest.approx((1 / 3 + 1) / 3)


def test_masked_items_are_never_recommended_and_cutoff_beyond_catalogue():
    seqs = make_seqs([[0, 1]])
    m = evaluate_recommender(FixedScores([[9.0, 1.0]]), seqs, cutoffs=(1, 5), exclude_seen=True,
                             chunk_size=8, item_popularity=np.array([7, 3]))
    assert m["recall@1"] == 1.0 and m["recall@5"] == 1.0
    assert m["coverage@5"] == 0.5  # item 0 is masked, so only item 1 is recommended
    assert m["popularity@5"] == 3.0


def test_every_target_is_counted_and_unrankable_ones_are_misses():
    dropped = {"unseen_target": 2, "unseen_context": 1, "no_history": 1}
    m = evaluate_recommender(FixedScores(THREE_SCORES), make_seqs(THREE_QUERIES, dropped=dropped),
                             cutoffs=(1,), exclude_seen=False, chunk_size=5)
    assert m["unseen_target"] == 2 and m["unseen_context"] == 1 and m["no_history"] == 1
    assert m["n_targets"] == 6 == m["n_queries"] + m["unseen_target"] + m["no_history"]
    assert m["recall@1"] == pytest.approx(1 / 6)  # 1 hit over 3 ranked + 3 unrankable targets
    assert target_line(m) == "6 targets = 3 ranked + 2 unseen target + 1 no history"
    assert "popularity@1" not in m  # only with item_popularity


def test_nan_scores_and_wrong_shapes_are_errors():
    seqs = make_seqs([[0, 1]])
    with pytest.raises(ValueError, match="NaN"):
        evaluate_recommender(FixedScores([[0.0, float("nan")]]), seqs, exclude_seen=False, chunk_size=1)
    with pytest.raises(ValueError, match="NaN"):  # NaN on a non-target item, and masked-in history
        evaluate_recommender(FixedScores([[1.0, 2.0, float("nan")]]), seqs, exclude_seen=True, chunk_size=1)
    bad = FixedScores([[0.0, 1.0]])
    bad.n_items = 3
    with pytest.raises(ValueError, match="shape"):
        evaluate_recommender(bad, seqs, exclude_seen=False, chunk_size=1)


def test_no_queries_gives_zero_metrics_and_counts():
    seqs = make_seqs([[0, 1]], n_context=[2], dropped={"unseen_target": 1})  # history only, no target
    m = evaluate_recommender(FixedScores(np.zeros((0, 2))), seqs, cutoffs=(1,), exclude_seen=True,
                             chunk_size=4)
    assert m["n_queries"] == 0 and m["recall@1"] == 0.0
    assert m["unseen_target"] == 1 and m["n_targets"] == 1


def test_history_pairs_vectorised():
    seqs = make_seqs(THREE_QUERIES)
    seq, pos = seqs.queries()
    rows, items = history_pairs(seqs, seq, pos)
    assert rows.tolist() == [0, 1, 1, 2]
    assert items.tolist() == [0, 0, 1, 3]


def test_canonical_topk_breaks_ties_by_lower_index_even_outside_the_list():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 5.0]])
    vals, idx = canonical_topk(scores, 2)
    assert idx.tolist() == [[1, 2], [4, 0]]
    assert vals.tolist() == [[3.0, 3.0], [5.0, 0.0]]


def test_count_at_least_over_column_blocks():
    scores = torch.round(torch.rand(5, 2500) * 10) / 10  # [5, 2500], many ties
    threshold = scores[:, 7:8]
    expected = (scores >= threshold).sum(dim=1)
    assert torch.equal(count_at_least(scores, threshold, block_cells=1), expected)  # 1024-column blocks
    assert torch.equal(count_at_least(scores, threshold), expected)


def naive_metrics(scores: np.ndarray, seqs: SequenceSet, cutoffs, exclude_seen, popularity):
    """Reference: one query at a time, plain Python."""
    seq, pos = seqs.queries()
    n = scores.shape[1]
    hits = {k: [] for k in cutoffs}
    recs: dict[int, list[int]] = {k: [] for k in cutoffs}
    for q, (s, p) in enumerate(zip(seq, pos, strict=True)):
        start = seqs.offsets[s]
        history = set(seqs.items[start : start + p].tolist())
        target = int(seqs.items[start + p])
        row = [(-math.inf if exclude_seen and i in history else float(scores[q, i])) for i in range(n)]
        rank = sum(v >= row[target] for v in row) if row[target] > -math.inf else n + 1
        ordered = [i for i in sorted(range(n), key=lambda i: (-row[i], i)) if row[i] > -math.inf]
        for k in cutoffs:
            hits[k].append(rank if rank <= k else 0)
            recs[k].extend(ordered[:k])
    out = {}
    for k in cutoffs:
        ranks = hits[k]
        out[f"recall@{k}"] = sum(r > 0 for r in ranks) / len(ranks)
        out[f"mrr@{k}"] = sum(1 / r for r in ranks if r) / len(ranks)
        out[f"ndcg@{k}"] = sum(1 / math.log2(r + 1) for r in ranks if r) / len(ranks)
        out[f"coverage@{k}"] = len(set(recs[k])) / n
        out[f"popularity@{k}"] = (sum(popularity[i] for i in recs[k]) / len(recs[k])) if recs[k] else 0.0
    return out


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_chunk_size_gives_identical_results_matching_a_naive_reference(data):
    n_items = data.draw(st.integers(1, 9))
    seqs_list = data.draw(st.lists(st.lists(st.integers(0, n_items - 1), min_size=2, max_size=6),
                                   min_size=1, max_size=6))
    seqs = make_seqs(seqs_list, n_context=[data.draw(st.integers(0, len(s) - 1)) for s in seqs_list])
    n_queries = len(seqs.queries()[0])
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    scores = np.round(rng.random((n_queries, n_items)), 1)  # rounding forces ties
    popularity = rng.integers(0, 100, n_items)
    exclude_seen = data.draw(st.booleans())
    chunk = data.draw(st.integers(1, n_queries + 2))
    cutoffs = (1, 2, 3, 5)
    kw = dict(cutoffs=cutoffs, exclude_seen=exclude_seen, item_popularity=popularity)
    rec = FixedScores(scores)
    whole = evaluate_recommender(rec, seqs, chunk_size=n_queries, **kw)
    chunked = evaluate_recommender(rec, seqs, chunk_size=chunk, **kw)
    single = evaluate_recommender(rec, seqs, chunk_size=1, **kw)
    assert whole == chunked == single  # bit-identical, coverage and popularity included
    reference = naive_metrics(scores.astype(np.float32), seqs, cutoffs, exclude_seen, popularity)
    for key, value in reference.items():
        assert whole[key] == pytest.approx(value, abs=1e-12), key


def write_split(split_dir, train, valid, test):
    split_dir.mkdir(parents=True)
    for name, (seqs, ctx) in {"train": (train, None), "valid": valid, "test": test}.items():
        pl.DataFrame({
            "user_id": list(range(len(seqs))),
            "items": seqs,
            "n_context": ctx or [0] * len(seqs),
        }, schema_overrides={"n_context": pl.Int32}).write_parquet(split_dir / f"{name}.parquet")
    vocab = Vocab.from_items(pl.Series([i for s in train for i in s]))
    vocab.save(split_dir / "vocab.parquet")
    return vocab


def test_evaluate_all_runs_baselines_and_reports_unseen_targets(tmp_path):
    train = [[10, 11, 12], [10, 11], [11, 13], [12, 10]]
    valid = ([[10, 11, 12]], [1])
    test = ([[11, 99, 10], [13, 11]], [1, 1])  # 99 is not in the training vocabulary
    vocab = write_split(tmp_path / "split", train, valid, test)
    config = Config()
    config.evaluate.cutoffs = [1, 2]
    config.policy.exclude = "none"
    rows = evaluate_all(config, tmp_path / "split", {}, split="test")
    assert list(rows) == ["item-knn", "most-popular"]
    for metrics in rows.values():
        assert metrics["unseen_target"] == 1
        assert metrics["n_queries"] == 2  # 11 -> 10 (99 removed) and 13 -> 11
        assert metrics["n_targets"] == 3  # 2 ranked + 1 unseen target
    # most-popular: items 10 and 11 both have 3 training events, 12 has 2, 13 has 1
    assert vocab.counts.tolist() == [3, 3, 2, 1]
    assert rows["most-popular"]["recall@2"] == pytest.approx(2 / 3)  # ranks 2, 2 (10, 11 tie) + 1 unseen
    assert rows["most-popular"]["recall@1"] == 0.0
    assert rows["most-popular"]["popularity@1"] == 3.0


def test_cli_evaluate_checkpoint_against_baselines(tmp_path):
    import json

    from typer.testing import CliRunner

    from recsys.cli import app
    from recsys.config import ModelConfig
    from recsys.model.checkpoint import save_checkpoint
    from recsys.model.gru4rec import GRU4Rec

    train = [[10, 11, 12], [10, 11], [11, 13], [12, 10]]
    vocab = write_split(tmp_path / "split", train, ([[10, 11, 12]], [1]), ([[11, 99, 10], [13, 11]], [1, 1]))
    config = Config()
    config.model = ModelConfig(hidden_size=4)
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "model.pt", model=GRU4Rec(len(vocab), config.model), optimizer=None,
                           config=config, vocab=vocab, epoch=1, metrics={})
    out = tmp_path / "metrics.json"
    (tmp_path / "conf").mkdir()  # defaults only, whatever the repository's conf/ says
    result = CliRunner().invoke(app, [
        "evaluate", "--checkpoint", str(ckpt), "--split-dir", str(tmp_path / "split"), "--split", "valid",
        "--device", "cpu", "--json", str(out), "--conf", str(tmp_path / "conf"),
        "--set", "evaluate.cutoffs=[1, 2]",
    ])
    assert result.exit_code == 0, result.output
    assert "GRU4Rec" in result.output and "item-kNN" in result.output and "most-popular" in result.output
    report = json.loads(out.read_text())
    assert list(report["rows"]) == ["gru4rec", "item-knn", "most-popular"]
    assert report["rows"]["gru4rec"]["n_queries"] == 2  # 10 -> 11, 10 11 -> 12
    # the checkpoint's stored policy (plain, no series), not the config's
    assert report["policy"] == {"exclude": "none", "continue_series": False, "continuation_slots": 0,
                                "partial_event_types": ["partial"], "override": None}
