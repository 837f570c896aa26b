"""Baselines reported beside the GRU in every evaluation: most-popular and session item-kNN.

Both implement :class:`recsys.training.protocol.Recommender` structurally and are fitted on the
training :class:`SequenceSet` only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from recsys.data.sequences import SequenceSet

if TYPE_CHECKING:
    from recsys.config import Config
    from recsys.training.protocol import Recommender

log = logging.getLogger(__name__)


def _n_queries(seqs: SequenceSet) -> int:
    return len(seqs.queries()[0])


@dataclass
class MostPopular:
    """Scores every item by its training event count, whatever the history."""

    counts: torch.Tensor  # [n_items] float32 training events per item
    n_items: int
    name: str = "most-popular"

    @classmethod
    def fit(cls, train: SequenceSet, n_items: int) -> MostPopular:
        counts = np.bincount(train.items, minlength=n_items)[:n_items]
        return cls(torch.from_numpy(counts.astype(np.float32)), n_items)

    def encode_queries(self, seqs: SequenceSet) -> torch.Tensor:
        return torch.zeros(_n_queries(seqs), 1)  # [Q, 1] no state: the history is ignored

    def score(self, states: torch.Tensor) -> torch.Tensor:
        counts = self.counts.to(states.device)
        return counts.unsqueeze(0).repeat(states.shape[0], 1)  # [b, n_items], a fresh tensor


@dataclass
class ItemKNN:
    """Item-to-item cosine similarity over sessions, scoring by the query's last item (GRU4Rec paper).

    ``sim(i, j) = cooc(i, j) / (sqrt(cnt_i * cnt_j) + lam)`` where ``cooc`` is the number of training
    sequences containing both items and ``cnt_i`` the number containing ``i`` (binary session vectors;
    ``lam`` shrinks similarities of rarely seen items). Each item keeps its ``neighbours`` most similar
    other items; every other item scores 0 (self-similarity is not used).
    """

    neighbours: torch.Tensor  # [n_items, k] int32 neighbour indices (padding: the item itself, sim 0)
    similarities: torch.Tensor  # [n_items, k] float32 similarity of each neighbour
    n_items: int
    name: str = "item-knn"
    _device_copies: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def fit(
        cls,
        train: SequenceSet,
        n_items: int,
        neighbours: int = 200,
        lam: float = 20.0,
        *,
        max_session_items: int = 200,
        pair_budget: int = 1 << 23,
    ) -> ItemKNN:
        """Count co-occurring pairs sparsely, block by block of item rows; keep each row's top neighbours.

        Work and memory scale with the number of co-occurring pairs, never with n_items squared:
        ``pair_budget`` bounds the pairs generated per block, and sequences are capped to their last
        ``max_session_items`` events so one very long history cannot dominate. Equal similarities are
        kept in neighbour-index order, so the result is deterministic.
        """
        if neighbours < 1:
            raise ValueError(f"neighbours must be >= 1, got {neighbours}")
        k = max(1, min(neighbours, n_items - 1))
        sess, item = _session_item_sets(train, n_items, max_session_items)
        sess_len = np.bincount(sess, minlength=train.n_sequences).astype(np.int64)  # [S] distinct items
        sess_ptr = np.concatenate([[0], np.cumsum(sess_len)])  # CSR over (sess, item), sorted by sess
        cnt = np.bincount(item, minlength=n_items).astype(np.int64)  # [n] sequences containing the item
        inv_sess = sess[np.argsort(item, kind="stable")]  # sequences of item 0, then item 1, ...
        item_ptr = np.concatenate([[0], np.cumsum(cnt)])
        # pairs (i, *) generated for row i: the total length of the sequences containing i
        pairs_per_item = np.bincount(item, weights=sess_len[sess], minlength=n_items).astype(np.int64)
        sqrt_cnt = np.sqrt(cnt.astype(np.float64))

        # padding: an item's own index with similarity 0 (never a real neighbour, so scatter is safe)
        nb_idx = np.repeat(np.arange(n_items, dtype=np.int32)[:, None], k, axis=1)  # [n, k]
        nb_sim = np.zeros((n_items, k), dtype=np.float32)  # [n, k]
        a = 0
        while a < n_items:
            b = _block_end(pairs_per_item, a, pair_budget)
            ent_sess = inv_sess[item_ptr[a] : item_ptr[b]]  # sequences of each row item
            ent_row = np.repeat(np.arange(a, b, dtype=np.int64), cnt[a:b])
            lengths = sess_len[ent_sess]
            within = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths,
                                                                              lengths)
            pair_col = item[np.repeat(sess_ptr[ent_sess], lengths) + within]  # [P]
            keys, cooc = np.unique(np.repeat(ent_row, lengths) * n_items + pair_col, return_counts=True)
            row, col = keys // n_items, keys % n_items
            real = row != col  # an item is not its own neighbour
            row, col, cooc = row[real], col[real], cooc[real]
            sim = cooc / (sqrt_cnt[row] * sqrt_cnt[col] + lam)  # [p] cosine with shrinkage
            order = np.lexsort((col, -sim, row))  # by row, best first, ties by index
            row, col, sim = row[order], col[order], sim[order]
            first = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])  # start of each row's run
            rank = np.arange(len(row)) - np.repeat(first, np.diff(np.r_[first, len(row)]))
            keep = rank < k
            nb_idx[row[keep], rank[keep]] = col[keep]
            nb_sim[row[keep], rank[keep]] = sim[keep]
            a = b
        log.info("item-kNN: %d items, up to %d neighbours each, %d co-occurrence pairs counted",
                 n_items, k, int(pairs_per_item.sum()))
        return cls(torch.from_numpy(nb_idx), torch.from_numpy(nb_sim), n_items)

    def encode_queries(self, seqs: SequenceSet) -> torch.Tensor:
        seq, pos = seqs.queries()
        last = seqs.items[seqs.offsets[seq] + pos - 1]  # [Q] the item just before each target
        return torch.from_numpy(last.astype(np.int64))[:, None]  # [Q, 1]

    def score(self, states: torch.Tensor) -> torch.Tensor:
        nb_idx, nb_sim = self._on(states.device)
        last = states[:, 0].long()  # [b]
        scores = torch.zeros((states.shape[0], self.n_items), device=states.device)  # [b, n_items]
        return scores.scatter_(1, nb_idx[last].long(), nb_sim[last])

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._device_copies:
            self._device_copies[key] = (self.neighbours.to(device), self.similarities.to(device))
        return self._device_copies[key]


def _session_item_sets(train: SequenceSet, n_items: int, max_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (sequence, item) pairs of the last ``max_items`` events of each sequence, sorted."""
    lengths = train.lengths
    seq_of = np.repeat(np.arange(train.n_sequences, dtype=np.int64), lengths)
    pos = np.arange(len(train.items), dtype=np.int64) - np.repeat(train.offsets[:-1], lengths)
    keep = pos >= np.repeat(np.maximum(lengths - max_items, 0), lengths)
    keys = np.unique(seq_of[keep] * n_items + train.items[keep])
    return keys // n_items, keys % n_items


def _block_end(pairs_per_item: np.ndarray, start: int, pair_budget: int) -> int:
    """End of the row block from ``start``: as many rows as fit ``pair_budget`` pairs (at least one)."""
    within = np.cumsum(pairs_per_item[start:])
    return start + max(1, int(np.searchsorted(within, pair_budget, side="right")))


def fit_baselines(config: Config, train: SequenceSet, n_items: int) -> dict[str, Recommender]:
    """Both baselines with the configured item-kNN settings, keyed by display name (kNN first)."""
    knn = ItemKNN.fit(train, n_items, config.evaluate.knn_neighbours, config.evaluate.knn_lambda)
    pop = MostPopular.fit(train, n_items)
    return {knn.name: knn, pop.name: pop}
