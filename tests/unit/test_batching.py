import numpy as np
import polars as pl

from recsys.data.sequences import SequenceSet
from recsys.model.batching import LONG_FIRST_FRACTION, assign_slots, plan_epoch


def _seqs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = rng.integers(0, 50, size=int(offsets[-1])).astype(np.int64)
    return SequenceSet(
        items=items,
        offsets=offsets,
        n_context=np.zeros(len(lengths), np.int64),
        user_ids=pl.Series(range(len(lengths))),
    )


def _naive(seqs, B):
    """Straightforward step-by-step simulation of session-parallel batching (the published loop)."""
    queue = [s for s in range(seqs.n_sequences) if seqs.lengths[s] >= 2]
    B = min(B, len(queue))
    cur, pos = [None] * B, [0] * B
    rows = []
    while True:
        inp, tgt, rst, act = [0] * B, [0] * B, [False] * B, [False] * B
        for k in range(B):
            if cur[k] is not None and pos[k] + 1 >= seqs.lengths[cur[k]]:
                cur[k] = None
            if cur[k] is None and queue:
                cur[k], pos[k], rst[k] = queue.pop(0), 0, True
            if cur[k] is not None:
                base = seqs.offsets[cur[k]] + pos[k]
                inp[k], tgt[k], act[k] = seqs.items[base], seqs.items[base + 1], True
                pos[k] += 1
        if not any(act):
            return rows
        rows.append((inp, tgt, rst, act))


def test_plan_matches_naive_reference_and_resets_exactly_at_boundaries():
    seqs = _seqs([5, 2, 9, 3, 1, 4, 7, 2, 2, 6, 3])  # one length-1 sequence: no pair, skipped
    plan = plan_epoch(seqs, 3, rng=None)
    ref = _naive(seqs, 3)
    assert plan.n_steps == len(ref)
    for name, i in (("inputs", 0), ("targets", 1), ("reset", 2), ("active", 3)):
        assert np.array_equal(getattr(plan, name), np.array([r[i] for r in ref])), name


def test_every_pair_used_once_and_reset_count_equals_sequences():
    seqs = _seqs([3, 8, 2, 5, 5, 11, 4, 2, 9, 3, 6, 2, 2, 7])
    plan = plan_epoch(seqs, 4, np.random.default_rng(1))
    assert plan.n_events == int((seqs.lengths - 1).sum())
    assert int(plan.reset.sum()) == seqs.n_sequences
    assert np.all(plan.active[plan.reset])
    got = sorted(zip(plan.inputs[plan.active].tolist(), plan.targets[plan.active].tolist(), strict=True))
    want = sorted(
        (int(seqs.items[i]), int(seqs.items[i + 1]))
        for s in range(seqs.n_sequences)
        for i in range(seqs.offsets[s], seqs.offsets[s + 1] - 1)
    )
    assert got == want


def test_shuffle_is_seeded_and_slots_never_exceed_sequences():
    seqs = _seqs([4, 6, 3])
    a = plan_epoch(seqs, 8, np.random.default_rng(5))
    b = plan_epoch(seqs, 8, np.random.default_rng(5))
    assert a.inputs.shape[1] == 3
    assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.reset, b.reset)


def test_assign_slots_is_list_scheduling():
    slot, start = assign_slots(np.array([3, 1, 2, 2, 1]), 2)
    assert slot.tolist() == [0, 1, 1, 0, 1]
    assert start.tolist() == [0, 0, 1, 3, 3]


def test_start_time_order_is_fixed_and_by_first_event():
    """train.epoch_order=start_time (the published order): sequences enter slots by start time."""
    seqs = _seqs([3, 1, 4, 2, 5])
    seqs.start_ts = np.array([50, 10, 40, 20, 30], dtype=np.int64)
    plan = plan_epoch(seqs, 1, np.random.default_rng(9), by_start_time=True)
    first_inputs = plan.inputs[plan.reset[:, 0], 0].tolist()  # one slot: sequences one after another
    by_time = [3, 4, 2, 0]  # sequence 1 (length 1) has no pair
    assert first_inputs == [int(seqs.items[seqs.offsets[s]]) for s in by_time]
    again = plan_epoch(seqs, 1, np.random.default_rng(10), by_start_time=True)
    assert np.array_equal(plan.inputs, again.inputs)  # the same every epoch, whatever the seed


def test_shuffled_epoch_starts_long_sequences_first_so_the_tail_stays_short():
    """A long sequence starting late would run alone with idle slots; long ones go first, shuffled."""
    rng = np.random.default_rng(3)
    lengths = np.concatenate([rng.integers(2, 12, 600), rng.integers(150, 400, 12)])
    rng.shuffle(lengths)
    seqs = _seqs(lengths.tolist())
    seqs.items = np.arange(len(seqs.items), dtype=np.int64)  # unique items: a first item names its sequence
    n_pairs = int((seqs.lengths - 1).sum())
    ideal = n_pairs / 16
    plan = plan_epoch(seqs, 16, np.random.default_rng(0))
    assert plan.n_events == n_pairs
    first_resets = plan.reset[0]  # the sequences each slot starts with
    long_rows = (seqs.lengths - 1) > ideal / LONG_FIRST_FRACTION
    starts_of_long = {int(seqs.items[seqs.offsets[s]]) for s in np.flatnonzero(long_rows)}
    assert first_resets.all() and len(starts_of_long) == 12
    assert starts_of_long <= set(plan.inputs[0].tolist())  # all 12 start at step 0
    assert plan.n_steps <= ideal * (1 + 1 / LONG_FIRST_FRACTION) + 12  # tail <= the threshold (+ rounding)
    # Plain list scheduling of the same shuffled order (what an epoch did before): a longer tail.
    order = np.random.default_rng(0).permutation(len(lengths))
    naive_steps = assign_slots(seqs.lengths[order] - 1, 16)
    assert plan.n_steps < int((naive_steps[1] + seqs.lengths[order] - 1).max())
    # Still a shuffle: another seed gives another order of the long sequences.
    other = plan_epoch(seqs, 16, np.random.default_rng(1))
    assert not np.array_equal(plan.inputs[0], other.inputs[0])
