"""Sampled ranking losses of GRU4Rec (Hidasi & Karatzoglou, CIKM 2018, section 3).

Scores are ``[B, C]``: row ``i`` is a mini-batch event, column ``j < B`` is row ``j``'s target (so the
diagonal of the first ``B`` columns holds the positives) and the remaining ``C - B`` columns are the
shared sampled negatives. A column whose item equals row ``i``'s target (a duplicate in-batch target or
a sampled negative that happens to be the target) is masked out of row ``i``: it is not a negative.
Columns of idle slots are masked for every row, and idle rows carry no loss; the loss is still divided
by the full batch size, so the thinly populated steps at the end of an epoch (when only the longest
sequences are left) make proportionally smaller updates instead of full-size, high-variance ones.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def negative_mask(
    col_items: Tensor, targets: Tensor, col_valid: Tensor | None, extra: Tensor | None = None,
    duplicates: bool = True,
) -> Tensor:
    """True where column j must not act as a negative for row i: [B, C].

    col_items [C] item of each column; targets [B]; col_valid [C] False for idle-slot columns;
    extra [B, C] further exclusions (e.g. items already in the row's history). The positive itself
    (the diagonal) is never masked, so idle rows carry a finite, zero-weighted loss.
    """
    B = targets.shape[0]
    same = col_items.unsqueeze(0) == targets.unsqueeze(1)  # [B, C]
    if not duplicates:  # train.mask_duplicate_targets=false: only the diagonal is the positive
        same = torch.zeros_like(same)
    if col_valid is not None:
        same |= ~col_valid.unsqueeze(0)  # [B, C]
    if extra is not None:
        same |= extra  # [B, C]
    same[:, :B].fill_diagonal_(False)  # [B, C]
    return same  # [B, C]


def cross_entropy(scores: Tensor, mask: Tensor, row_weight: Tensor | None) -> Tensor:
    """Softmax cross-entropy of the positive against all unmasked columns, mean over rows.

    scores [B, C] (logQ already applied), mask [B, C], row_weight [B] (0 for idle rows) or None.
    """
    B = scores.shape[0]
    logits = scores.masked_fill(mask, float("-inf"))  # [B, C]
    labels = torch.arange(B, device=scores.device)  # [B] positive = diagonal
    if row_weight is None:
        return F.cross_entropy(logits, labels)  # []
    per_row = F.cross_entropy(logits, labels, reduction="none")  # [B]
    return (per_row * row_weight).sum() / per_row.shape[0]  # [] idle rows count as zero loss


def bpr_max(scores: Tensor, mask: Tensor, row_weight: Tensor | None, bpreg: float) -> Tensor:
    """BPR-max with score regularisation, mean over rows.

    loss_i = -log( sum_j s_ij * sigmoid(r_i - r_ij) ) + bpreg * sum_j s_ij * r_ij^2, where s_i is the
    softmax of row i's scores over its negatives only (positive and masked columns excluded).
    """
    B = scores.shape[0]
    pos = scores[:, :B].diagonal().unsqueeze(1)  # [B, 1]
    neg_mask = mask.clone()  # [B, C]
    neg_mask[:, :B].fill_diagonal_(True)  # [B, C] exclude the positive from the negatives
    weights = torch.softmax(scores.masked_fill(neg_mask, float("-inf")), dim=1)  # [B, C]
    weights = weights.masked_fill(neg_mask, 0.0)  # [B, C] rows with no negative give 0, not NaN
    ranking = torch.sigmoid(pos - scores)  # [B, C]
    per_row = -torch.log((weights * ranking).sum(dim=1) + 1e-24)  # [B]
    per_row = per_row + bpreg * (weights * scores.square()).sum(dim=1)  # [B]
    if row_weight is None:
        return per_row.mean()  # []
    return (per_row * row_weight).sum() / per_row.shape[0]  # [] idle rows count as zero loss


def sampled_loss(
    scores: Tensor,
    col_items: Tensor,
    targets: Tensor,
    active: Tensor | None,
    *,
    loss: str,
    bpreg: float = 1.0,
    elu_param: float = 0.0,
    logq: float = 0.0,
    log_prob: Tensor | None = None,
    extra_mask: Tensor | None = None,
    log_prob_targets: Tensor | None = None,
    mask_duplicates: bool = True,
) -> Tensor:
    """Loss of one mini-batch. scores [B, C]; col_items [C]; targets [B]; active [B] bool or None.

    ``extra_mask`` [B, C] removes more negatives per row (``train.mask_seen_negatives``).

    ``logq > 0`` subtracts ``logq * log P(sample item)`` from every column's score (sampling-bias
    correction; ``log_prob`` [n_items] from the sampler). BPR-max applies ELU(``elu_param``) to the scores
    first, as in the 2018 paper (``elu_param == 0``: scores used as they are). ``log_prob_targets``
    [n_items], when given, corrects the first ``B`` (in-batch target) columns instead of ``log_prob``.
    ``mask_duplicates=False`` keeps columns equal to the row's target as negatives (published code).
    """
    B = targets.shape[0]
    col_valid = None
    row_weight = None
    if active is not None:
        row_weight = active.to(scores.dtype)  # [B]
        col_valid = torch.cat(
            [active, torch.ones(scores.shape[1] - B, dtype=torch.bool, device=active.device)]
        )
    mask = negative_mask(col_items, targets, col_valid, extra_mask, mask_duplicates)  # [B, C]
    if logq > 0 and log_prob is not None:
        correction = log_prob[col_items]  # [C]
        if log_prob_targets is not None:
            correction = torch.cat([log_prob_targets[col_items[:B]], correction[B:]])  # [C]
        scores = scores - logq * correction.unsqueeze(0)  # [B, C]
    if loss == "cross_entropy":
        return cross_entropy(scores, mask, row_weight)
    if loss == "bpr_max":
        if elu_param > 0:
            scores = F.elu(scores, alpha=elu_param)  # [B, C]
        return bpr_max(scores, mask, row_weight, bpreg)
    raise ValueError(f"unknown loss {loss!r} (cross_entropy | bpr_max)")
