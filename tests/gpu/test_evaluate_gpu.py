"""Evaluation on CUDA gives exactly the CPU numbers (skipped without a GPU: ``pytest -m gpu tests/gpu``)."""

import numpy as np
import polars as pl
import pytest
import torch

from recsys.data.sequences import SequenceSet
from recsys.training.baselines import ItemKNN, MostPopular
from recsys.training.evaluate import evaluate_recommender

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


class Fixed:
    name = "fixed"

    def __init__(self, scores: np.ndarray):
        self.matrix = torch.from_numpy(scores.astype(np.float32))
        self.n_items = scores.shape[1]

    def encode_queries(self, seqs: SequenceSet) -> torch.Tensor:
        return torch.arange(len(seqs.queries()[0]))[:, None]

    def score(self, states: torch.Tensor) -> torch.Tensor:
        return self.matrix.to(states.device)[states[:, 0]]


def random_sequences(n_items: int, n_seq: int, seed: int) -> SequenceSet:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 40, n_seq)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = (rng.zipf(1.3, int(lengths.sum())) % n_items).astype(np.int64)
    return SequenceSet(items, offsets, np.zeros(n_seq, np.int64), pl.Series(range(n_seq)), {})


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_cuda_matches_cpu_bit_for_bit(exclude_seen):
    n_items = 3000
    seqs = random_sequences(n_items, 300, seed=1)
    q = len(seqs.queries()[0])
    scores = np.round(np.random.default_rng(2).random((q, n_items)), 2)  # heavy ties
    train = random_sequences(n_items, 2000, seed=3)
    pop = np.bincount(train.items, minlength=n_items)
    recs = [Fixed(scores), MostPopular.fit(train, n_items), ItemKNN.fit(train, n_items, 50, 5.0)]
    for rec in recs:
        kw = dict(exclude_seen=exclude_seen, item_popularity=pop)
        cpu = evaluate_recommender(rec, seqs, chunk_size=512, device="cpu", **kw)
        gpu = evaluate_recommender(rec, seqs, chunk_size=97, device="cuda", **kw)
        assert cpu == gpu, rec.name
