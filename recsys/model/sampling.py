"""Popularity-based negative sampling shared by a mini-batch (Hidasi & Karatzoglou 2018, section 3.2).

Negatives are drawn from ``count ** alpha`` in bulk for ``store_batches`` steps at once, on the
training device, with a dedicated generator so that resumed runs draw the same stream. The log of each
item's sampling probability is kept for the optional logQ correction.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class NegativeSampler:
    """Draws ``n_sample`` items per step from popularity^alpha, refilled ``store_batches`` steps at a time."""

    def __init__(
        self,
        counts: np.ndarray,
        n_sample: int,
        alpha: float,
        store_batches: int,
        device: torch.device | str,
        seed: int,
    ) -> None:
        self.n_sample = n_sample
        self.store_batches = store_batches
        self.device = torch.device(device)
        weights = np.power(np.maximum(counts.astype(np.float64), 1e-12), alpha)  # [n_items]
        prob = weights / weights.sum()  # [n_items]
        cdf = np.cumsum(prob)  # [n_items]
        cdf[-1] = 1.0 + 1e-9  # guard rounding so searchsorted never returns n_items
        self.cdf = torch.from_numpy(cdf).to(self.device, torch.float64)  # [n_items]
        self.log_prob = torch.from_numpy(np.log(prob)).to(self.device, torch.float32)  # [n_items]
        # log training count: the logQ of in-batch targets with train.logq_targets=count
        self.log_count = torch.from_numpy(np.log(np.maximum(counts.astype(np.float64), 1e-12))).to(
            self.device, torch.float32)  # [n_items]
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self._store = torch.empty(0, n_sample, dtype=torch.int64, device=self.device)  # [k, n_sample]
        self._next = 0

    def _refill(self) -> None:
        u = torch.rand(
            self.store_batches * self.n_sample,
            generator=self.generator,
            device=self.device,
            dtype=torch.float64,
        )  # [k * n_sample]
        self._store = torch.searchsorted(self.cdf, u).view(self.store_batches, self.n_sample)  # [k, n_sample]
        self._next = 0

    def draw(self) -> Tensor:
        """Negatives for the next step: [n_sample] int64 item indices (empty when n_sample == 0)."""
        if self.n_sample == 0:
            return self._store[0:0].view(0)  # [0]
        if self._next >= self._store.shape[0]:
            self._refill()
        out = self._store[self._next]  # [n_sample]
        self._next += 1
        return out

    def state_dict(self) -> dict:
        """Generator state plus the unread part of the store: resuming continues the same stream."""
        return {
            "generator": self.generator.get_state(),  # uint8 tensor
            "store": self._store.cpu(),
            "next": self._next,
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._store = state["store"].to(self.device)
        self._next = int(state["next"])
