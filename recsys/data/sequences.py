"""Split files as flat index arrays: the one form that training, evaluation and scoring consume.

A split file (``train``/``valid``/``test.parquet``) holds one row per sequence with an ``items`` list and
``n_context``; here its items become vocabulary indices in one flat array with offsets, so batching and
ranking are vectorised and never loop over events in Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from recsys.data.vocab import Vocab
from recsys.schemas import ITEMS, N_CONTEXT, SESSION_ID, START_TS, USER_ID


@dataclass
class SequenceSet:
    """Sequences of item indices.

    ``items[offsets[s]:offsets[s+1]]`` is sequence ``s`` (all indices valid, >= 0). Positions
    ``p >= max(n_context[s], 1)`` are next-item targets predicted from the items before ``p``.
    Items unknown to the vocabulary were removed when loading and are counted in ``dropped``.
    """

    items: np.ndarray  # [N] int64 item indices
    offsets: np.ndarray  # [S+1] int64, offsets[0] == 0, offsets[-1] == N
    n_context: np.ndarray  # [S] int64 leading history-only positions
    user_ids: pl.Series  # [S] original user id of each sequence
    dropped: dict[str, int] = field(default_factory=dict)  # what was removed on load, by reason
    start_ts: np.ndarray | None = None  # [S] int64 first-event time (µs) when the file has start_ts

    @property
    def n_sequences(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def queries(self) -> tuple[np.ndarray, np.ndarray]:
        """Every target, in canonical order: (sequence index [Q], position within the sequence [Q]).

        Ordered by sequence, then position. The flat index of a query's target is
        ``offsets[seq] + pos``; its history is ``items[offsets[seq] : offsets[seq] + pos]``.
        """
        lengths = self.lengths
        first = np.maximum(self.n_context, 1)
        counts = np.clip(lengths - first, 0, None)
        seq = np.repeat(np.arange(self.n_sequences, dtype=np.int64), counts)
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        pos = np.arange(len(seq), dtype=np.int64) - starts + np.repeat(first, counts)
        return seq, pos

    def targets(self) -> np.ndarray:
        """Item index of every query's target, canonical order [Q]."""
        seq, pos = self.queries()
        return self.items[self.offsets[seq] + pos]


def load_sequences(path: Path, vocab: Vocab) -> SequenceSet:
    """Read a split file and map its items to vocabulary indices.

    Unknown items (not in the training vocabulary) are removed from the sequence: an unknown target
    cannot be ranked (counted as ``unseen_target``), an unknown history item cannot be fed
    (``unseen_context``). A target left without any history is counted as ``no_history``.
    """
    extra = [START_TS] if START_TS in pl.read_parquet_schema(path) else []
    return _to_sequence_set(pl.read_parquet(path, columns=[USER_ID, ITEMS, N_CONTEXT, *extra]), vocab)


def load_train_and_valid(train_path: Path, valid_path: Path, vocab: Vocab) -> SequenceSet:
    """Every sequence as far as the validation split sees it, all positions trainable (refit data).

    A validation row extends its training row (same sequence, later cut-off), so it replaces it;
    training rows without a validation row are kept. Rows are matched by ``session_id``, or by
    ``user_id`` in split files without session ids (whole-user sequences).
    """
    frame = train_and_valid_frame(train_path, valid_path)
    return _to_sequence_set(frame.with_columns(pl.lit(0, dtype=pl.Int32).alias(N_CONTEXT)), vocab)


def train_and_valid_frame(train_path: Path, valid_path: Path) -> pl.DataFrame:
    """(key, user_id, items) of every sequence as the validation split sees it (see load_train_and_valid)."""
    names = set(pl.read_parquet_schema(train_path)) & set(pl.read_parquet_schema(valid_path))
    key = SESSION_ID if SESSION_ID in names else USER_ID
    columns = list(dict.fromkeys([key, USER_ID, ITEMS] + ([START_TS] if START_TS in names else [])))
    train = pl.read_parquet(train_path, columns=columns)
    valid = pl.read_parquet(valid_path, columns=columns)
    return pl.concat([valid, train.join(valid.select(key), on=key, how="anti")])


def _to_sequence_set(frame: pl.DataFrame, vocab: Vocab) -> SequenceSet:
    """(user_id, items, n_context) rows -> flat vocabulary indices; unknown items removed and counted."""
    lengths = frame[ITEMS].list.len().cast(pl.Int64).to_numpy()
    flat_ids = frame[ITEMS].explode()
    idx = vocab.index_of(flat_ids)
    n_context = frame[N_CONTEXT].cast(pl.Int64).to_numpy()

    seq_of = np.repeat(np.arange(frame.height), lengths)
    pos_in_seq = np.arange(len(idx)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    is_context = pos_in_seq < np.repeat(n_context, lengths)
    known = idx >= 0

    dropped = {
        "unseen_target": int(np.sum(~known & ~is_context & (pos_in_seq > 0))),
        "unseen_context": int(np.sum(~known & is_context)),
    }
    new_lengths = np.bincount(seq_of[known], minlength=frame.height).astype(np.int64)
    new_context = np.bincount(seq_of[known & is_context], minlength=frame.height).astype(np.int64)
    # A known target with no known item before it (its sequence's first known item, at a target position:
    # the first item or the whole context was unknown) cannot be ranked: counted, never silently lost.
    known_before = np.cumsum(known) - known  # [N] known items earlier in the flat array
    first_known = known & (known_before == np.repeat(np.cumsum(new_lengths) - new_lengths, lengths))
    dropped["no_history"] = int(np.sum(first_known & ~is_context & (pos_in_seq > 0)))

    offsets = np.zeros(frame.height + 1, dtype=np.int64)
    np.cumsum(new_lengths, out=offsets[1:])
    return SequenceSet(
        items=idx[known].astype(np.int64),
        offsets=offsets,
        n_context=new_context,
        user_ids=frame[USER_ID],
        dropped=dropped,
        start_ts=frame[START_TS].dt.epoch("us").to_numpy() if START_TS in frame.columns else None,
    )
