"""GRU4Rec behind the evaluation ``Recommender`` protocol (recsys.training.evaluate).

A query at position ``pos`` of a sequence is represented by the network output after feeding
``items[:pos]``, i.e. the output at position ``pos - 1``. Every sequence is fed once, up to its last
query, in batches of similar length (sorted, right-padded; the network is causal so padding is harmless),
and the outputs at every query position are gathered: one pass per sequence however many queries it has.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from recsys.data.sequences import SequenceSet
from recsys.model.gru4rec import GRU4Rec


class GRU4RecRecommender:
    """``encode_queries`` -> final hidden outputs [Q, H]; ``score`` -> full-catalogue scores [b, n_items]."""

    def __init__(
        self,
        model: GRU4Rec,
        device: str | torch.device = "cpu",
        name: str = "gru4rec",
        max_cells: int = 1 << 18,
    ) -> None:
        self.model = model
        self.device = torch.device(device)
        self.name = name
        self.n_items = model.n_items
        self.max_cells = max_cells  # padded positions fed per batch (bounds memory of [b, L, H])
        self.uses_history = model.history_bias is not None  # scores shift for history items (HistoryAware)

    @torch.no_grad()
    def encode_queries(self, seqs: SequenceSet) -> Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            return self._encode(seqs)
        finally:
            self.model.train(was_training)

    def _encode(self, seqs: SequenceSet) -> Tensor:
        seq, pos = seqs.queries()  # [Q], [Q]
        H = self.model.hidden_size
        out = torch.zeros(len(seq), H, device=self.device)  # [Q, H]
        if len(seq) == 0:
            return out
        need = np.zeros(seqs.n_sequences, dtype=np.int64)  # [S] prefix length to feed
        np.maximum.at(need, seq, pos)
        order = np.argsort(need, kind="stable")
        order = order[need[order] > 0]  # sequences with at least one query, shortest first
        # Queries grouped by sequence (canonical order already is): first query row of every sequence.
        q_start = np.searchsorted(seq, np.arange(seqs.n_sequences))  # [S]
        q_end = np.searchsorted(seq, np.arange(seqs.n_sequences), side="right")  # [S]
        i = 0
        while i < len(order):
            # grow the batch while the padded size (longest = last, sorted) stays within budget
            j = i + 1
            while j < len(order) and (j + 1 - i) * int(need[order[j]]) <= self.max_cells:
                j += 1
            batch = order[i:j]  # [b]
            L = int(need[batch[-1]])
            lengths = need[batch]  # [b]
            items = np.zeros((len(batch), L), dtype=np.int64)  # [b, L]
            mask = np.arange(L)[None, :] < lengths[:, None]  # [b, L]
            flat = np.repeat(seqs.offsets[batch], lengths) + (
                np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            )  # [sum lengths]
            items[mask] = seqs.items[flat]
            outputs = self.model.sequence_outputs(
                torch.from_numpy(items).to(self.device), torch.from_numpy(lengths).to(self.device)
            ).float()  # [b, L, H]
            # Every query of these sequences: (row in batch, position - 1) -> its canonical slot.
            counts = q_end[batch] - q_start[batch]  # [b]
            rows = np.repeat(np.arange(len(batch)), counts)  # [q]
            qidx = np.repeat(q_start[batch], counts) + (
                np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
            )  # [q]
            r = torch.from_numpy(rows).to(self.device)
            p = torch.from_numpy(pos[qidx] - 1).to(self.device)
            out[torch.from_numpy(qidx).to(self.device)] = outputs[r, p]  # [q, H]
            i = j
        return out  # [Q, H]

    @torch.no_grad()
    def score(self, states: Tensor) -> Tensor:
        return self.model.score_items(states.to(self.device)).float()  # [b, n_items]

    @torch.no_grad()
    def add_history_bias(self, scores: Tensor, rows: Tensor, cols: Tensor) -> None:
        """The model's learned repeat offset on (row, item) history pairs (a no-op when it has none)."""
        self.model.add_history_bias(scores, rows, cols)
