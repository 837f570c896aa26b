import math

import pytest
import torch

from recsys.model.losses import negative_mask, sampled_loss


def _lse(xs):
    return math.log(sum(math.exp(x) for x in xs))


def test_cross_entropy_hand_computed():
    scores = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # columns: target0, target1, one negative
    loss = sampled_loss(scores, torch.tensor([5, 6, 7]), torch.tensor([5, 6]), None, loss="cross_entropy")
    want = ((_lse([2, 0, 1]) - 2) + (_lse([0, 1, 0]) - 1)) / 2  # 0.4076 and 0.5514
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert want == pytest.approx(0.47950, abs=1e-4)


def test_negative_equal_to_target_is_masked():
    scores = torch.tensor([[2.0, 0.0, 1.0, 3.0]])
    # column 3 samples item 5 = row 0's target: it must not count as a negative
    loss = sampled_loss(scores, torch.tensor([5, 6, 7, 5]), torch.tensor([5]), None, loss="cross_entropy")
    assert loss.item() == pytest.approx(_lse([2, 0, 1]) - 2, abs=1e-6)
    mask = negative_mask(torch.tensor([5, 5, 7]), torch.tensor([5, 5]), None)
    assert mask.tolist() == [[False, True, False], [True, False, False]]  # in-batch duplicate masked too


def test_idle_rows_and_columns_are_ignored():
    scores = torch.tensor([[2.0, 9.0, 1.0], [0.0, 1.0, 0.0]])
    active = torch.tensor([True, False])
    loss = sampled_loss(scores, torch.tensor([5, 0, 7]), torch.tensor([5, 0]), active, loss="cross_entropy")
    assert loss.item() == pytest.approx((_lse([2, 1]) - 2) / 2, abs=1e-6)  # summed over active rows / B


def test_bpr_max_hand_computed():
    scores = torch.tensor([[1.0, 0.0, 2.0]])  # positive 1.0; negatives 0.0 and 2.0
    w0, w1 = 1 / (1 + math.e**2), math.e**2 / (1 + math.e**2)  # softmax over the negatives
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    for bpreg in (0.0, 0.5):
        want = -math.log(w0 * sig(1.0) + w1 * sig(-1.0)) + bpreg * (w0 * 0.0 + w1 * 4.0)
        got = sampled_loss(
            scores, torch.tensor([3, 4, 5]), torch.tensor([3]), None, loss="bpr_max", bpreg=bpreg
        )
        assert got.item() == pytest.approx(want, abs=1e-6)


def test_logq_subtracts_log_sampling_probability():
    scores = torch.tensor([[1.0, 0.5]])
    log_prob = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    got = sampled_loss(
        scores,
        torch.tensor([0, 1]),
        torch.tensor([0]),
        None,
        loss="cross_entropy",
        logq=1.0,
        log_prob=log_prob,
    )
    a, b = 1.0 - math.log(0.5), 0.5 - math.log(0.25)
    assert got.item() == pytest.approx(_lse([a, b]) - a, abs=1e-6)


def test_unknown_loss_is_an_error():
    with pytest.raises(ValueError, match="unknown loss"):
        sampled_loss(torch.zeros(1, 1), torch.tensor([0]), torch.tensor([0]), None, loss="top1")


def test_extra_mask_removes_history_negatives_but_never_the_positive():
    scores = torch.tensor([[2.0, 0.0, 1.0]])
    extra = torch.tensor([[True, False, True]])  # the positive's own column is ignored in the mask
    got = sampled_loss(
        scores, torch.tensor([5, 6, 7]), torch.tensor([5]), None, loss="cross_entropy", extra_mask=extra
    )
    assert got.item() == pytest.approx(_lse([2, 0]) - 2, abs=1e-6)


def test_published_logq_and_duplicate_targets_settings():
    """train.logq_targets=count corrects in-batch targets by log(count) and the extra samples by the
    sampling log-probability; train.mask_duplicate_targets=false keeps target-equal columns (published)."""
    scores = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # target0, target1, one sample
    cols, targets = torch.tensor([0, 1, 2]), torch.tensor([0, 1])
    log_prob = torch.log(torch.tensor([0.5, 0.25, 0.25]))  # popularity^alpha, normalised
    log_count = torch.log(torch.tensor([8.0, 2.0, 2.0]))
    common = dict(loss="cross_entropy", logq=1.0, log_prob=log_prob)
    sampling = sampled_loss(scores, cols, targets, None, **common)
    corrected = scores - log_prob[cols]
    want = sum(_lse(corrected[i].tolist()) - corrected[i, i].item() for i in range(2)) / 2
    assert sampling.item() == pytest.approx(want, abs=1e-6)
    count = sampled_loss(scores, cols, targets, None, log_prob_targets=log_count, **common)
    published = scores - torch.cat([log_count[cols[:2]], log_prob[cols[2:]]])
    want = sum(_lse(published[i].tolist()) - published[i, i].item() for i in range(2)) / 2
    assert count.item() == pytest.approx(want, abs=1e-6) and count.item() != pytest.approx(sampling.item())
    # a sample equal to the target stays in the softmax when duplicates are not masked
    dup = torch.tensor([[2.0, 0.0, 1.0, 3.0]])
    kept = sampled_loss(dup, torch.tensor([5, 6, 7, 5]), torch.tensor([5]), None, loss="cross_entropy",
                        mask_duplicates=False)
    assert kept.item() == pytest.approx(_lse([2, 0, 1, 3]) - 2, abs=1e-6)
