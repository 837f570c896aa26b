import pytest
import torch
from model_data import cyclic_sequences, write_split_dir

import recsys.model.step as step_module
from recsys.config import load_config
from recsys.model.checkpoint import load_checkpoint
from recsys.model.policy import Policy, resolve_mask_seen
from recsys.training.epochs import _cpu_threads
from recsys.training.train import NonFiniteLossError, train_model

TINY = [
    "model.hidden_size=16",
    "train.batch_size=8",
    "train.n_sample=16",
    "train.sample_store_batches=3",
    "sessions.mode=user",
    "train.device=cpu",
]


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    return write_split_dir(tmp_path_factory.mktemp("split"), cyclic_sequences())


def _config(tmp_path, *extra):
    return load_config(overrides=[f"paths.data_root={tmp_path}", *TINY, *extra])


def test_trains_beats_popularity_and_checkpoints(tmp_path, split_dir):
    seen = []
    res = train_model(_config(tmp_path, "train.epochs=3"), split_dir, on_epoch=seen.append)
    assert res.best_checkpoint == tmp_path / "checkpoints" / "gru4rec" / "best.pt"
    assert [e["epoch"] for e in seen] == [1, 2, 3] and set(seen[0]) >= {
        "train_loss",
        "events_per_second",
        "epoch_seconds",
        "valid",
    }
    assert res.test_metrics["mrr@20"] > 2 * res.baseline_metrics["most-popular"]["mrr@20"]
    assert res.test_metrics["recall@5"] > res.baseline_metrics["most-popular"]["recall@5"]
    best = max(range(3), key=lambda i: res.history[i]["valid"]["mrr@20"])
    assert res.best_epoch == best + 1 == load_checkpoint(res.best_checkpoint).epoch


def test_resume_reaches_the_same_weights(tmp_path, split_dir):
    common = ["model.dropout_embed=0.2", "model.dropout_hidden=0.1", "train.momentum=0.3", "train.patience=9"]
    full = train_model(_config(tmp_path / "a", "train.epochs=2", *common), split_dir, evaluate_test=False)
    train_model(_config(tmp_path / "b", "train.epochs=1", *common), split_dir, evaluate_test=False)
    resumed = train_model(
        _config(tmp_path / "b", "train.epochs=2", *common), split_dir, resume=True, evaluate_test=False
    )
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    a = load_checkpoint(full.best_checkpoint.with_name("last.pt")).model_state
    b = load_checkpoint(resumed.best_checkpoint.with_name("last.pt")).model_state
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fast", [True, False])
def test_non_finite_loss_names_epoch_and_step(tmp_path, split_dir, monkeypatch, fast):
    import recsys.model.fused_step as fused_module

    module, name = (fused_module, "cross_entropy_grad") if fast else (step_module, "sampled_loss")
    real = getattr(module, name)
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        if calls["n"] != 5:
            return out
        return (out[0] * float("nan"), out[1]) if fast else out * float("nan")

    monkeypatch.setattr(module, name, poisoned)
    with pytest.raises(NonFiniteLossError, match="epoch 1, step 4"):
        config = _config(tmp_path, "train.epochs=1", f"train.fast_step={fast}")
        train_model(config, split_dir, evaluate_test=False)


def test_seen_negative_bitmap_follows_slot_resets(tmp_path, split_dir):
    import numpy as np

    from recsys.data.sequences import load_sequences
    from recsys.data.vocab import Vocab
    from recsys.model.batching import plan_epoch
    from recsys.model.gru4rec import GRU4Rec
    from recsys.model.step import SessionParallelTrainer

    config = _config(tmp_path, "train.mask_seen_negatives=true")
    vocab = Vocab.load(split_dir / "vocab.parquet")
    seqs = load_sequences(split_dir / "train.parquet", vocab)
    trainer = SessionParallelTrainer(
        GRU4Rec(len(vocab), config.model), config.train, vocab.counts, torch.device("cpu")
    )
    plan = plan_epoch(seqs, 8, np.random.default_rng(0))
    with _cpu_threads(torch.device("cpu"), 1):
        trainer.run_epoch(plan.to_torch("cpu"), 1)
    # after the epoch, each slot's bitmap holds exactly the inputs fed since its last reset
    for k in range(plan.inputs.shape[1]):
        last_reset = int(np.nonzero(plan.reset[:, k])[0].max())
        fed = set(plan.inputs[last_reset:, k][plan.active[last_reset:, k]].tolist())
        assert set(torch.nonzero(trainer.seen[k]).flatten().tolist()) - {0} == fed - {0}


def test_mask_seen_negatives_follows_the_policy_unless_set(tmp_path):
    def mask(exclude, *sets):
        config = load_config(overrides=[f"paths.data_root={tmp_path}", *sets])
        return resolve_mask_seen(config, Policy(exclude=exclude))

    assert mask("all") is True  # every history item is excluded when ranking: no use as a negative
    assert mask("completed") is False  # resumable and continuation items must stay learnable
    assert mask("none") is False
    # a learnt history bias only gets a gradient from history items that are negatives
    assert mask("all", "model.history_bias=true") is False
    assert mask("all", "train.mask_seen_negatives=false") is False


def test_refit_vocabulary_includes_items_first_seen_in_validation(tmp_path):
    from model_data import write_split_dir

    from recsys.data.sequences import load_sequences
    from recsys.data.vocab import Vocab
    from recsys.training.train import refit_vocab

    # 7 appears first in validation (A), then is a test target (B)
    split = write_split_dir(tmp_path / "split", [[1, 2, 3, 4, 7, 5]] * 20 + [[2, 3, 4, 5, 8, 7]] * 20)
    base = Vocab.load(split / "vocab.parquet")
    grown = refit_vocab(split)
    assert len(grown) > len(base)
    test_base = load_sequences(split / "test.parquet", base)
    test_grown = load_sequences(split / "test.parquet", grown)
    assert test_grown.dropped["unseen_target"] < test_base.dropped["unseen_target"]


def test_refit_replaces_best_with_a_train_plus_valid_model_and_resume_redoes_a_killed_refit(
    tmp_path, split_dir, monkeypatch
):
    import recsys.training.train as train_module

    sets = ["train.epochs=2", "train.patience=9", "train.refit=true"]
    full = train_model(_config(tmp_path / "a", *sets), split_dir, evaluate_test=False)
    refitted = load_checkpoint(full.best_checkpoint)
    assert full.refit_epochs == full.best_epoch == refitted.extra["refit_epochs"] == refitted.epoch
    selected = load_checkpoint(full.best_checkpoint.with_name("last.pt")).model_state
    assert not all(torch.equal(selected[k], refitted.model_state[k]) for k in selected)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed during the refit")

    monkeypatch.setattr(train_module, "_refit", killed)
    with pytest.raises(KeyboardInterrupt):
        train_model(_config(tmp_path / "b", *sets), split_dir, evaluate_test=False)
    monkeypatch.undo()
    before = load_checkpoint(tmp_path / "b" / "checkpoints" / "gru4rec" / "best.pt")
    assert "refit_epochs" not in before.extra  # the selected model is still there, whole
    resumed = train_model(_config(tmp_path / "b", *sets), split_dir, resume=True, evaluate_test=False)
    again = load_checkpoint(resumed.best_checkpoint)
    assert resumed.refit_epochs == full.refit_epochs
    assert all(torch.equal(again.model_state[k], refitted.model_state[k]) for k in refitted.model_state)


@pytest.mark.parametrize("repeats", [False, True])
def test_history_bias_learns_whether_the_data_repeat_items(tmp_path, repeats):
    import numpy as np
    from model_data import write_split_dir

    rng = np.random.default_rng(3)
    if repeats:  # every sequence cycles through its own three items: the next item was already seen
        seqs = [[int(i) for i in rng.choice(40, 3, replace=False)] * 5 for _ in range(60)]
    else:  # every sequence is a run of distinct items: a watched item never comes back
        seqs = [[int(i) for i in rng.permutation(40)[:15]] for _ in range(60)]
    split = write_split_dir(tmp_path / "split", seqs)
    res = train_model(
        _config(tmp_path, "train.epochs=2", "model.history_bias=true", "policy.exclude=none"),
        split, evaluate_test=False,
    )
    bias = float(load_checkpoint(res.best_checkpoint).model_state["history_bias"])
    assert bias > 0.2 if repeats else bias < -0.2
    plain = train_model(_config(tmp_path / "plain", "train.epochs=2", "policy.exclude=none"), split,
                        evaluate_test=False)
    assert "history_bias" not in load_checkpoint(plain.best_checkpoint).model_state
    if not repeats:  # ranking watched items down is what unmasked evaluation rewards here
        assert res.history[-1]["valid"]["mrr@20"] > plain.history[-1]["valid"]["mrr@20"]
