"""Baselines reported beside the GRU in every evaluation: most-popular and session item-kNN.

Both implement :class:`recsys.evaluate.Recommender` structurally (no import needed) and are fitted on the
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
    from recsys.evaluate import Recommender

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

    neighbours: torch.Tensor  # [n_items, k] int64 neighbour indices
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
        block_cells: int = 1 << 23,
        pair_budget: int = 1 << 23,
    ) -> ItemKNN:
        """Count co-occurrences block by block of item rows, keep the top neighbours of each row.

        Memory is bounded by ``block_cells`` (dense rows x n_items per block) and ``pair_budget``
        (co-occurrence pairs generated per block); sequences are capped to their last
        ``max_session_items`` events so one very long history cannot dominate time and memory.
        """
        if neighbours < 1:
            raise ValueError(f"neighbours must be >= 1, got {neighbours}")
        k = min(neighbours, n_items)
        sess, item = _session_item_sets(train, n_items, max_session_items)
        n_seq = train.n_sequences
        sess_len = np.bincount(sess, minlength=n_seq).astype(np.int64)  # [S] distinct items per sequence
        sess_ptr = np.concatenate([[0], np.cumsum(sess_len)])  # CSR over (sess, item), sorted by sess
        cnt = np.bincount(item, minlength=n_items).astype(np.int64)  # [n] sequences containing the item
        by_item = np.argsort(item, kind="stable")
        inv_sess = sess[by_item]  # sequences of item 0, then item 1, ...
        item_ptr = np.concatenate([[0], np.cumsum(cnt)])
        # pairs (i, *) generated for row i: the total length of the sequences containing i
        pairs_per_item = np.bincount(item, weights=sess_len[sess], minlength=n_items).astype(np.int64)

        nb_idx = torch.zeros((n_items, k), dtype=torch.int64)
        nb_sim = torch.zeros((n_items, k), dtype=torch.float32)
        max_rows = max(1, block_cells // max(n_items, 1))
        sqrt_cnt = np.sqrt(cnt.astype(np.float64))
        a = 0
        while a < n_items:
            b = _block_end(pairs_per_item, a, max_rows, pair_budget)
            rows = b - a
            ent_sess = inv_sess[item_ptr[a] : item_ptr[b]]  # sequences of each row item
            ent_row = np.repeat(np.arange(rows, dtype=np.int64), cnt[a:b])
            lengths = sess_len[ent_sess]
            total = int(lengths.sum())
            pair_row = np.repeat(ent_row, lengths)
            within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            pair_col = item[np.repeat(sess_ptr[ent_sess], lengths) + within]
            cooc = np.bincount(pair_row * n_items + pair_col, minlength=rows * n_items)
            cooc = cooc.reshape(rows, n_items).astype(np.float64)  # [rows, n]
            cooc[np.arange(rows), np.arange(a, b)] = 0.0  # an item is not its own neighbour
            denom = sqrt_cnt[a:b, None] * sqrt_cnt[None, :] + lam  # [rows, n]
            sim = np.divide(cooc, denom, out=np.zeros_like(cooc), where=cooc > 0)
            top = torch.topk(torch.from_numpy(sim.astype(np.float32)), k, dim=1)
            nb_sim[a:b], nb_idx[a:b] = top.values, top.indices
            a = b
        log.info("item-kNN: %d items, %d neighbours each, %d co-occurrence pairs counted",
                 n_items, k, int(pairs_per_item.sum()))
        return cls(nb_idx, nb_sim, n_items)

    def encode_queries(self, seqs: SequenceSet) -> torch.Tensor:
        seq, pos = seqs.queries()
        last = seqs.items[seqs.offsets[seq] + pos - 1]  # [Q] the item just before each target
        return torch.from_numpy(last.astype(np.int64))[:, None]  # [Q, 1]

    def score(self, states: torch.Tensor) -> torch.Tensor:
        nb_idx, nb_sim = self._on(states.device)
        last = states[:, 0].long()  # [b]
        scores = torch.zeros((states.shape[0], self.n_items), device=states.device)  # [b, n_items]
        return scores.scatter_(1, nb_idx[last], nb_sim[last])

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


def _block_end(pairs_per_item: np.ndarray, start: int, max_rows: int, pair_budget: int) -> int:
    """End of the row block from ``start``: at most ``max_rows`` rows and ``pair_budget`` pairs (>= 1 row)."""
    stop = min(start + max_rows, len(pairs_per_item))
    within = np.cumsum(pairs_per_item[start:stop])
    fits = int(np.searchsorted(within, pair_budget, side="right"))
    return start + max(1, fits)


def fit_baselines(config: Config, train: SequenceSet, n_items: int) -> dict[str, Recommender]:
    """Both baselines with the configured item-kNN settings, keyed by display name (kNN first)."""
    knn = ItemKNN.fit(train, n_items, config.evaluate.knn_neighbours, config.evaluate.knn_lambda)
    pop = MostPopular.fit(train, n_items)
    return {knn.name: knn, pop.name: pop}
