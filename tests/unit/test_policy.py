"""One recommendation policy: evaluation, the promotion gate, batch scoring and the pyfunc rank one user
identically under the policy stored in the model (seen-item masking, series continuation, history bias)."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta

import numpy as np
import polars as pl
import pytest
import torch
from mlflow_fixtures import make_config

from recsys.config import load_config
from recsys.data.sequences import SequenceSet
from recsys.data.vocab import Vocab
from recsys.model.checkpoint import build_model, load_checkpoint, save_checkpoint
from recsys.model.gru4rec import GRU4Rec
from recsys.model.policy import (
    Policy,
    PolicyMismatchError,
    apply_policy,
    continuation_pairs,
    policy_for_model,
    resolve_policy,
)
from recsys.model.pyfunc import recommend
from recsys.model.recommender import GRU4RecRecommender
from recsys.training.evaluate import evaluate_recommender

# Series 1: ids 100..105 (S01E01..S01E06), series 2: 110..113, films 200..209.
SERIES = {1: [100, 101, 102, 103, 104, 105], 2: [110, 111, 112, 113]}
FILMS = list(range(200, 210))
ITEMS = [i for eps in SERIES.values() for i in eps] + FILMS
# A viewer who watched S01 up to E04 and a film, then re-watches E01 -> E02: E03 must stay eligible.
HISTORY = [100, 101, 102, 103, 200, 110, 100, 101]
USER = 7
RUN_DATE = date(2026, 3, 10)


def write_catalogue(path):
    rows = [(i, "series", s, 1, e + 1) for s, eps in SERIES.items() for e, i in enumerate(eps)]
    rows += [(i, "film", None, None, None) for i in FILMS]
    pl.DataFrame(rows, schema={"item_id": pl.Int64, "kind": pl.String, "series_id": pl.Int64,
                               "season": pl.Int32, "episode": pl.Int32}, orient="row").write_parquet(path)


def write_split_record(split_dir, mode):
    split_dir.mkdir(parents=True, exist_ok=True)
    (split_dir / "stats.json").write_text(json.dumps({"sequences_built": {"sessions": {"mode": mode},
                                                                          "protocol": "temporal"}}))


def test_series_continuation_keeps_the_next_episode_after_the_latest_watched_one(tmp_path):
    config = load_config(overrides=[f"paths.data_root={tmp_path}"])
    vocab = Vocab.from_items(pl.Series("item_id", ITEMS, dtype=pl.Int64))
    write_catalogue(tmp_path / "catalogue.parquet")
    config.policy.catalogue = tmp_path / "catalogue.parquet"
    write_split_record(tmp_path / "split", "gap")
    policy = resolve_policy(config, vocab, tmp_path / "split")
    assert policy.exclude == "completed" and policy.continues  # auto from the split's sessions mode
    idx = vocab.index_of(pl.Series(HISTORY)).tolist()
    rows, nxt = continuation_pairs(torch.zeros(len(idx), dtype=torch.long), torch.tensor(idx), policy)
    assert sorted(vocab.item_ids.gather(nxt.numpy()).to_list()) == [102, 111]  # E03 (not E05), series 2 E02
    scores = torch.zeros(1, len(vocab))
    apply_policy(scores, torch.zeros(len(idx), dtype=torch.long), torch.tensor(idx), policy)
    allowed = set(vocab.item_ids.gather(np.flatnonzero(scores[0].numpy() > -np.inf)).to_list())
    assert 102 in allowed and not allowed & {100, 101, 103, 110, 200}
    # a watch that was not finished may be resumed under `completed`, never under `all`
    done = torch.tensor([i != 200 for i in HISTORY])
    for exclude, resumable in (("completed", True), ("all", False)):
        scores = torch.zeros(1, len(vocab))
        apply_policy(scores, torch.zeros(len(idx), dtype=torch.long), torch.tensor(idx),
                     Policy(exclude=exclude), completed=done)
        assert bool(scores[0, idx[4]] > -np.inf) is resumable
    write_split_record(tmp_path / "split", "user")
    assert resolve_policy(config, vocab, tmp_path / "split").exclude == "all"  # rating logs


def test_a_config_asking_for_other_rules_is_an_error_unless_overridden(tmp_path):
    stored = Policy(exclude="all")
    vocab = Vocab.from_items(pl.Series("item_id", ITEMS, dtype=pl.Int64))
    config = load_config(overrides=[f"paths.data_root={tmp_path}"])
    assert policy_for_model(stored, config, vocab, "x") == (stored, None)  # auto: the stored one
    config.policy.exclude = "none"
    with pytest.raises(PolicyMismatchError, match="trained and gated with policy exclude=all"):
        policy_for_model(stored, config, vocab, "x")
    config.policy.override = True
    used, note = policy_for_model(stored, config, vocab, "x")
    assert used.exclude == "none" and "override" in note and "exclude=all" in note


def test_continuation_slots_lead_the_list_with_the_latest_series_next_episodes():
    """The next episodes of the N most recently watched series go to the top, most recent series first;
    the rest keeps the model's order; 0 slots only keeps them eligible (the older rule)."""
    vocab = Vocab.from_items(pl.Series("item_id", ITEMS, dtype=pl.Int64))
    ids = vocab.item_ids.to_list()
    series = np.array([1 if i in SERIES[1] else 2 if i in SERIES[2] else -1 for i in ids]) - 1
    series[series < -1] = -1
    next_item = np.full(len(ids), -1)
    for eps in SERIES.values():
        for a, b in zip(eps[:-1], eps[1:], strict=True):
            next_item[ids.index(a)] = ids.index(b)
    # two viewers: one watched series 2 last, one series 1 last (HISTORY)
    histories = [[100, 101, 110, 200], HISTORY]
    rows = torch.tensor([r for r, h in enumerate(histories) for _ in h])
    cols = torch.from_numpy(np.concatenate([vocab.index_of(pl.Series(h)) for h in histories]))
    raw = torch.linspace(1, 2, len(ids)).repeat(2, 1)  # [2, n_items] films score highest
    for slots, want_top in ((0, {0: [209, 208], 1: [209, 208]}), (1, {0: [111, 209], 1: [102, 209]}),
                            (2, {0: [111, 102, 209], 1: [102, 111, 209]})):
        policy = Policy(exclude="all", continue_series=True, continuation_slots=slots, next_item=next_item,
                        series=series)
        scores = raw.clone()
        apply_policy(scores, rows, cols, policy)
        for r, want in want_top.items():
            order = torch.sort(scores[r], descending=True, stable=True).indices[: len(want)]
            assert vocab.item_ids.gather(order.numpy()).to_list() == want, (slots, r)
        back = Policy.from_plain(policy.to_plain())
        assert back.rules == policy.rules and back.rules["continuation_slots"] == slots
    plain = policy.to_plain()
    del plain["continuation_slots"]  # a model saved before slots existed keeps the older rule
    assert Policy.from_plain(plain).slots == 0
    assert Policy(exclude="all", continuation_slots=3).slots == 0  # no series: nothing to continue
    with pytest.raises(ValueError, match="continuation_slots"):
        Policy(continuation_slots=-1)


def test_a_config_asking_for_other_continuation_slots_is_an_error_unless_overridden(tmp_path):
    stored = Policy(exclude="all", continue_series=True, continuation_slots=6,
                    next_item=np.full(len(ITEMS), -1), series=np.full(len(ITEMS), -1))
    vocab = Vocab.from_items(pl.Series("item_id", ITEMS, dtype=pl.Int64))
    config = load_config(overrides=[f"paths.data_root={tmp_path}", "policy.continuation_slots=0"])
    with pytest.raises(PolicyMismatchError, match="continuation_slots=0"):
        policy_for_model(stored, config, vocab, "x")
    config.policy.override = True
    used, note = policy_for_model(stored, config, vocab, "x")
    assert used.slots == 0 and "continuation_slots=6" in note


def _events(history: list[int]) -> pl.DataFrame:
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    other = [(USER + 1, 104, t0), (USER + 1, 105, t0 + timedelta(hours=1))]
    rows = [(USER, item, t0 + timedelta(hours=i)) for i, item in enumerate(history)] + other
    schema = {"user_id": pl.Int64, "item_id": pl.Int64, "ts": pl.Datetime("us", "UTC")}
    frame = pl.DataFrame(rows, schema=schema, orient="row")
    return frame.with_columns(pl.lit("complete").alias("event_type"))


@pytest.mark.parametrize("exclude", ["all", "none"])
def test_evaluation_gate_scoring_and_pyfunc_rank_one_user_identically(tmp_path, exclude):
    import mlflow

    from recsys.serving.score import score_users
    from recsys.tracking.promotion import promote
    from recsys.tracking.runs import register_checkpoint

    root = tmp_path / "data"
    config = make_config(root, policy={"exclude": exclude, "catalogue": str(tmp_path / "catalogue.parquet")},
                         model={"hidden_size": 8, "history_bias": True},
                         score={"top_k": len(ITEMS), "device": "cpu"})
    write_catalogue(tmp_path / "catalogue.parquet")
    vocab = Vocab.from_items(pl.Series("item_id", ITEMS + FILMS[:3] + [100], dtype=pl.Int64))
    write_split_record(config.paths.split_dir, "gap")
    policy = resolve_policy(config, vocab, config.paths.split_dir)
    assert policy.continues and policy.exclude == exclude
    torch.manual_seed(3)
    model = GRU4Rec(len(vocab), config.model).eval()
    model.history_bias.data.fill_(-0.7)  # a learnt repeat offset: matters wherever history is not masked
    ckpt_path = save_checkpoint(root / "model.pt", model=model, optimizer=None, config=config, vocab=vocab,
                                epoch=1, metrics={}, policy=policy)
    ckpt = load_checkpoint(ckpt_path)
    model = build_model(ckpt)
    idx = vocab.index_of(pl.Series(HISTORY))

    # the reference: the model's scores for the history, the policy's rules written out by hand
    with torch.no_grad():
        states = model.final_states(torch.from_numpy(idx.copy())[None], torch.tensor([len(idx)]))  # [1, H]
        raw = model.score_items(states)[0]  # [n_items]
    want = raw.clone()
    for i in set(idx.tolist()):
        want[i] = -np.inf if exclude == "all" else raw[i] + model.history_bias
    e03, s2e02 = vocab.index_of(pl.Series([102, 111])).tolist()
    want[e03], want[s2e02] = raw[e03], raw[s2e02]  # the next episodes stay eligible, unbiased
    # continuation slots (the default 6 covers both series): the latest series' next episode (E03) first,
    # then series 2's E02, above everything else (steps of max(1, |best score|))
    top = want[torch.isfinite(want)].max()
    want[e03], want[s2e02] = top + 6 * top.abs().clamp(min=1), top + 5 * top.abs().clamp(min=1)
    order = torch.sort(want, descending=True, stable=True).indices
    want_ids = [vocab.item_ids[int(i)] for i in order if want[i] > -np.inf]
    assert want_ids[:2] == [102, 111]

    # pyfunc (in process, with the stored policy) and batch scoring
    got = recommend(model, vocab, [USER], [HISTORY], top_k=len(ITEMS), policy=ckpt.policy)
    assert got["item_id"].tolist() == want_ids
    events_dir = config.paths.events_dir / "event_date=2026-03-01"
    events_dir.mkdir(parents=True)
    _events(HISTORY).write_parquet(events_dir / "part-0.parquet")
    manifest = score_users(config, model_uri=str(ckpt_path), run_date=RUN_DATE)
    recs = pl.read_parquet(f"{manifest['path']}/*.parquet").filter(pl.col("user_id") == USER).sort("rank")
    assert recs["item_id"].to_list() == want_ids
    assert manifest["policy"]["exclude"] == exclude and manifest["policy"]["override"] is None
    # the export says which items the rule placed: their score is the rule's, so monitoring leaves it out
    assert recs["source"].to_list() == ["continuation"] * 2 + ["model"] * (len(want_ids) - 2)
    everyone = pl.read_parquet(f"{manifest['path']}/*.parquet")
    model_scores = everyone.filter(pl.col("source") == "model")["score"]
    median = float(model_scores.median())
    placed_share = (everyone["source"] == "continuation").sum() / everyone.height
    assert manifest["monitoring"]["metrics"]["continuation_share"] == pytest.approx(placed_share)
    assert manifest["monitoring"]["metrics"]["score_p50"] == pytest.approx(median, rel=1e-5)
    # a withdrawn next episode stays out of the list: the rule never brings back an excluded title
    (root / "withdrawn.txt").write_text("102\n")
    config.score.exclude_items_file = root / "withdrawn.txt"
    manifest = score_users(config, model_uri=str(ckpt_path), run_date=RUN_DATE + timedelta(days=1))
    recs = pl.read_parquet(f"{manifest['path']}/*.parquet").filter(pl.col("user_id") == USER).sort("rank")
    assert recs["item_id"].to_list() == [i for i in want_ids if i != 102]
    assert recs["source"].to_list()[:2] == ["continuation", "model"]
    config.score.exclude_items_file = None

    # evaluation: the rank of every possible next item equals its place in the served list
    rec = GRU4RecRecommender(model, "cpu")
    for item in (102, want_ids[0], want_ids[-1]):
        seq = np.r_[idx, vocab.index_of(pl.Series([item]))]
        seqs = SequenceSet(seq, np.array([0, len(seq)]), np.array([len(idx)]), pl.Series("user_id", [USER]))
        m = evaluate_recommender(rec, seqs, cutoffs=(len(vocab),), policy=ckpt.policy, chunk_size=4)
        assert m[f"mrr@{len(vocab)}"] == pytest.approx(1 / (want_ids.index(item) + 1))

    # the promotion gate ranks the test split under the stored policy: its MRR is the served rank of E03
    test = pl.DataFrame({"user_id": [USER], "items": [HISTORY + [102]], "n_context": [len(HISTORY)]},
                        schema_overrides={"n_context": pl.Int32})
    for name in ("train", "valid", "test"):
        (test if name == "test" else test.with_columns(pl.lit(0, pl.Int32).alias("n_context"))).write_parquet(
            config.paths.split_dir / f"{name}.parquet")
    vocab.save(config.paths.split_dir / "vocab.parquet")
    version = register_checkpoint(config, ckpt_path)["model_version"]
    decision = promote(config)
    assert decision.challenger_version == str(version)
    assert decision.challenger_metrics["mrr@20"] == pytest.approx(1.0)  # E03 leads the list
    assert decision.policy["exclude"] == exclude and decision.policy["continue_series"] is True
    # and the registered pyfunc serves the same list
    served = mlflow.pyfunc.load_model(f"models:/{config.tracking.registered_model}/{version}").predict(
        pl.DataFrame({"user_id": [USER], "history": [HISTORY]}).to_pandas(), params={"top_k": len(ITEMS)})
    assert served["item_id"].tolist() == want_ids
