import numpy as np
import polars as pl

from recsys.data.sequences import load_sequences
from recsys.data.vocab import Vocab


def _write_split(path, rows):
    schema = {"user_id": pl.String, "items": pl.List(pl.Int64), "n_context": pl.Int32}
    pl.DataFrame(rows, schema=schema).write_parquet(path)


def test_vocab_orders_by_count_and_maps_unknown_to_minus_one(tmp_path):
    vocab = Vocab.from_items(pl.Series([5, 7, 7, 9, 9, 9]))
    assert vocab.item_ids.to_list() == [9, 7, 5]
    assert vocab.counts.tolist() == [3, 2, 1]
    assert vocab.index_of(pl.Series([7, 42, 9])).tolist() == [1, -1, 0]
    vocab.save(tmp_path / "v.parquet")
    assert Vocab.load(tmp_path / "v.parquet").frame.equals(vocab.frame)


def test_queries_follow_n_context(tmp_path):
    vocab = Vocab.from_items(pl.Series([1, 2, 3, 4]))
    _write_split(tmp_path / "s.parquet", [
        {"user_id": "a", "items": [1, 2, 3], "n_context": 0},   # targets at positions 1, 2
        {"user_id": "b", "items": [4, 3, 2, 1], "n_context": 3},  # target at position 3 only
    ])
    seqs = load_sequences(tmp_path / "s.parquet", vocab)
    seq, pos = seqs.queries()
    assert seq.tolist() == [0, 0, 1]
    assert pos.tolist() == [1, 2, 3]
    assert vocab.item_ids.gather(seqs.targets()).to_list() == [2, 3, 1]
    assert seqs.dropped == {"unseen_target": 0, "unseen_context": 0, "no_history": 0}


def test_unknown_items_are_removed_and_counted(tmp_path):
    vocab = Vocab.from_items(pl.Series([1, 2, 3]))
    _write_split(tmp_path / "s.parquet", [
        {"user_id": "a", "items": [1, 99, 2, 98], "n_context": 2},  # 99 unseen context, 98 unseen target
        {"user_id": "b", "items": [97, 3, 1], "n_context": 1},  # history vanished: 3 cannot be predicted
    ])
    seqs = load_sequences(tmp_path / "s.parquet", vocab)
    assert seqs.dropped == {"unseen_target": 1, "unseen_context": 2, "no_history": 1}
    assert seqs.offsets.tolist() == [0, 2, 4]
    assert seqs.n_context.tolist() == [1, 0]
    seq, pos = seqs.queries()
    assert seq.tolist() == [0, 1] and pos.tolist() == [1, 1]
    assert np.array_equal(vocab.item_ids.gather(seqs.targets()).to_numpy(), [2, 1])


def test_train_and_valid_union_takes_each_sequence_as_far_as_validation_sees_it(tmp_path):
    from recsys.data.sequences import load_train_and_valid

    schema = {"session_id": pl.Int64, "user_id": pl.String, "items": pl.List(pl.Int64), "n_context": pl.Int32}
    pl.DataFrame({"session_id": [1, 2, 3], "user_id": ["a", "a", "b"], "items": [[1, 2], [3, 4], [5, 6]],
                  "n_context": [0, 0, 0]}, schema=schema).write_parquet(tmp_path / "train.parquet")
    pl.DataFrame({"session_id": [2, 4], "user_id": ["a", "c"], "items": [[3, 4, 7], [8, 1]],
                  "n_context": [2, 0]}, schema=schema).write_parquet(tmp_path / "valid.parquet")
    vocab = Vocab.from_items(pl.Series([1, 2, 3, 4, 5, 6, 7, 8]))
    seqs = load_train_and_valid(tmp_path / "train.parquet", tmp_path / "valid.parquet", vocab)
    rows = sorted(
        vocab.item_ids.gather(seqs.items[seqs.offsets[s] : seqs.offsets[s + 1]]).to_list()
        for s in range(seqs.n_sequences)
    )
    # session 2 grew by its validation event (7), session 4 lies wholly in the validation window
    assert rows == [[1, 2], [3, 4, 7], [5, 6], [8, 1]]
    assert seqs.n_context.tolist() == [0, 0, 0, 0]  # every position is a training target
    # without session ids (whole-user split files) rows are matched by user
    for name in ("train", "valid"):
        path = tmp_path / f"{name}.parquet"
        pl.read_parquet(path).drop("session_id").unique("user_id", keep="last").write_parquet(path)
    by_user = load_train_and_valid(tmp_path / "train.parquet", tmp_path / "valid.parquet", vocab)
    assert by_user.n_sequences == 3 and sorted(by_user.user_ids.to_list()) == ["a", "b", "c"]
