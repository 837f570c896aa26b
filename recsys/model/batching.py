"""Session-parallel mini-batches (GRU4Rec, Hidasi et al. 2016, section 3.1.1), precomputed per epoch.

``B`` slots each run one sequence at a time; every step feeds one item per slot and asks for the next
one. When a slot's sequence ends it takes the next sequence of the (shuffled) epoch order and its hidden
state is reset to zero. Slot assignment is list scheduling (the slot that frees up first takes the next
sequence, ties to the lower slot) and needs one pass over *sequences*; every per-event array is then
built with vectorised numpy, so there is no per-event Python loop. When the queue is empty the slots
that finish early idle (``active`` false, excluded from the loss and from the negatives) until the last
sequence ends, so an epoch uses every training event exactly once.

Idle slots still cost a full step, so a long sequence that starts late makes a long, mostly idle tail
(ml-100k, 64 slots: ~2,000 steps for ~1,520 steps of events). A shuffled epoch therefore starts the
sequences longer than ``1/LONG_FIRST_FRACTION`` of the ideal step count (events / slots) first, in
their shuffled order, then the rest in theirs: the tail is then at most that long (~1,575 steps).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import torch

from recsys.data.sequences import SequenceSet

# A sequence longer than (training events / slots) / LONG_FIRST_FRACTION starts at the head of a shuffled
# epoch. 16 measured best on ml-100k's whole-user sequences (8: +7 % steps over ideal, 16: +4 %, 32: +11 %:
# too many "long" sequences then crowd the head and the tail grows again).
LONG_FIRST_FRACTION = 16


@dataclass
class EpochPlan:
    """All steps of one epoch. Arrays are [T, B]: T steps, B slots."""

    inputs: np.ndarray  # [T, B] int64 item fed at this step (0 where idle)
    targets: np.ndarray  # [T, B] int64 next item to predict (0 where idle)
    reset: np.ndarray  # [T, B] bool: slot starts a new sequence at this step (state zeroed first)
    active: np.ndarray  # [T, B] bool: slot holds a real event at this step

    @property
    def n_steps(self) -> int:
        return self.inputs.shape[0]

    @property
    def n_events(self) -> int:
        return int(self.active.sum())

    def to_torch(self, device: torch.device | str) -> DevicePlan:
        """Move the whole epoch to the device once, so steps only slice (no host-device stalls)."""
        return DevicePlan(
            inputs=torch.from_numpy(self.inputs).to(device),  # [T, B]
            targets=torch.from_numpy(self.targets).to(device),  # [T, B]
            keep=torch.from_numpy(~self.reset).to(device=device, dtype=torch.float32),  # [T, B]
            active=torch.from_numpy(self.active).to(device),  # [T, B]
            all_active=self.active.all(axis=1).tolist(),  # [T] host-side flags, no sync needed
        )


@dataclass
class DevicePlan:
    inputs: torch.Tensor  # [T, B]
    targets: torch.Tensor  # [T, B]
    keep: torch.Tensor  # [T, B] 0.0 where the state must be reset
    active: torch.Tensor  # [T, B] bool
    all_active: list[bool]  # [T]


def training_sequences(seqs: SequenceSet) -> tuple[np.ndarray, np.ndarray]:
    """(start offset, number of steps) of every sequence that has at least one (input, target) pair."""
    lengths = seqs.lengths  # [S]
    keep = lengths >= 2
    return seqs.offsets[:-1][keep].astype(np.int64), (lengths[keep] - 1).astype(np.int64)  # [S'], [S']


def assign_slots(n_steps: np.ndarray, n_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """List scheduling of sequences (in the given order) onto slots.

    Returns (slot [S], start step [S]). A heap over slots: one Python iteration per sequence.
    """
    S = len(n_steps)
    slot = np.empty(S, dtype=np.int64)
    start = np.empty(S, dtype=np.int64)
    first = min(S, n_slots)
    slot[:first] = np.arange(first)
    start[:first] = 0
    heap = [(int(n_steps[k]), k) for k in range(first)]
    heapq.heapify(heap)
    steps = n_steps.tolist()
    for s in range(first, S):
        free_at, k = heap[0]
        slot[s] = k
        start[s] = free_at
        heapq.heapreplace(heap, (free_at + steps[s], k))
    return slot, start


def _long_sequences_first(starts: np.ndarray, n_steps: np.ndarray,
                          batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Stable partition: sequences longer than the threshold first, each group in its given order."""
    threshold = n_steps.sum() / max(1, batch_size) / LONG_FIRST_FRACTION
    order = np.argsort(n_steps <= threshold, kind="stable")  # [S] long (False) before short (True)
    return starts[order], n_steps[order]


def plan_epoch(seqs: SequenceSet, batch_size: int, rng: np.random.Generator | None,
               by_start_time: bool = False) -> EpochPlan:
    """Build one epoch's step arrays; ``rng`` shuffles the sequence order (None keeps file order), long
    sequences first; ``by_start_time`` orders by first-event time (``train.epoch_order=start_time``)."""
    starts, n_steps = training_sequences(seqs)  # [S], [S]
    order = rng.permutation(len(starts)) if rng is not None else np.arange(len(starts))
    if by_start_time and seqs.start_ts is not None:
        order = np.argsort(seqs.start_ts[seqs.lengths >= 2], kind="stable")
    starts, n_steps = starts[order], n_steps[order]
    if rng is not None and not by_start_time:
        starts, n_steps = _long_sequences_first(starts, n_steps, batch_size)
    B = max(1, min(batch_size, len(starts)))
    slot, t0 = assign_slots(n_steps, B)  # [S], [S]
    T = int((t0 + n_steps).max()) if len(starts) else 0
    total = int(n_steps.sum())
    # Per event (vectorised): which sequence, offset within it.
    seq_of = np.repeat(np.arange(len(starts)), n_steps)  # [E]
    within = np.arange(total) - np.repeat(np.cumsum(n_steps) - n_steps, n_steps)  # [E]
    step = t0[seq_of] + within  # [E]
    col = slot[seq_of]  # [E]
    src = starts[seq_of] + within  # [E] flat index of the input item
    inputs = np.zeros((T, B), dtype=np.int64)
    targets = np.zeros((T, B), dtype=np.int64)
    reset = np.zeros((T, B), dtype=bool)
    active = np.zeros((T, B), dtype=bool)
    inputs[step, col] = seqs.items[src]
    targets[step, col] = seqs.items[src + 1]
    active[step, col] = True
    reset[t0, slot] = True
    return EpochPlan(inputs=inputs, targets=targets, reset=reset, active=active)
