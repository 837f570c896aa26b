"""What the evaluator asks of a recommender: the GRU, item-kNN and most-popular all meet it structurally.

Kept apart from the evaluator so that the baselines (which the evaluator fits) can name the protocol
without importing the evaluator back.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from recsys.data.sequences import SequenceSet

__all__ = ["HistoryAware", "Recommender"]


@runtime_checkable
class Recommender(Protocol):
    """Anything that scores the full catalogue for a query.

    ``encode_queries`` returns one state row per query of ``seqs.queries()``, canonical order (the GRU's
    final hidden state, the last item's index for item-kNN, a dummy for most-popular). ``score`` maps a
    chunk of states to scores over every item (higher = better) and returns a tensor the caller owns:
    the evaluator masks it in place.
    """

    name: str
    n_items: int

    def encode_queries(self, seqs: SequenceSet) -> torch.Tensor: ...  # [Q, D]

    def score(self, states: torch.Tensor) -> torch.Tensor: ...  # [b, D] -> [b, n_items]


@runtime_checkable
class HistoryAware(Protocol):
    """A recommender whose scores may also depend on which items a query's history holds (not only on its
    state): GRU4Rec with ``model.history_bias``. Applied only when history items are not masked anyway;
    ``uses_history`` False (no bias learnt) spares the evaluator building the history pairs."""

    uses_history: bool

    def add_history_bias(self, scores: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> None: ...
