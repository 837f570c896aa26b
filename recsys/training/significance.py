"""Confidence intervals over per-target values: how sure a metric (or a difference of two) really is.

A (paired) Poisson bootstrap: each resample weights every target by an independent Poisson(1) count,
which approximates drawing the targets with replacement but lets every slice be resampled with the
same weights in one matrix product (resamples x targets times targets x slices) instead of one draw
per slice. Pairing comes from the caller passing differences ``a - b`` of two models on the same targets,
so the per-target correlation of the two models is kept and the interval is much narrower than two
independent intervals would suggest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

ALL = "all"


@dataclass(frozen=True)
class Interval:
    """The mean of a per-target value over ``n`` targets and its bootstrap interval."""

    n: int
    mean: float
    low: float
    high: float
    p_not_positive: float  # share of resamples whose mean is <= 0: a one-sided p-value for "mean > 0"
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bootstrap_means(
    values: np.ndarray,
    masks: Mapping[str, np.ndarray] | None = None,
    *,
    confidence: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
    block: int = 100,
) -> dict[str, Interval]:
    """Mean and percentile interval of ``values`` [T] over all targets (key ``"all"``) and every mask.

    ``masks`` maps a slice name to a bool [T]; an empty slice gets NaN bounds. Deterministic for a seed.
    Memory is ``block`` x T weights at a time.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    values = np.asarray(values, dtype=np.float64)  # [T]
    names = [ALL, *(masks or {})]
    member = np.ones((len(names), len(values)), dtype=np.float64)  # [S, T] slice membership
    for s, name in enumerate(names[1:], start=1):
        mask = np.asarray(masks[name], dtype=bool)
        if mask.shape != values.shape:
            raise ValueError(f"slice {name!r}: mask shape {mask.shape} != values shape {values.shape}")
        member[s] = mask
    counts = member.sum(axis=1)  # [S]
    sums = member @ values  # [S]
    weighted = member * values  # [S, T]
    rng = np.random.default_rng(seed)
    boot = np.empty((n_resamples, len(names)), dtype=np.float64)  # [B, S] resampled means
    for lo in range(0, n_resamples, block):
        hi = min(lo + block, n_resamples)
        w = rng.poisson(1.0, size=(hi - lo, len(values))).astype(np.float64)  # [b, T]
        num, den = w @ weighted.T, w @ member.T  # [b, S]
        with np.errstate(invalid="ignore", divide="ignore"):
            boot[lo:hi] = num / den
    alpha = (1.0 - confidence) / 2.0
    out: dict[str, Interval] = {}
    for s, name in enumerate(names):
        n = int(counts[s])
        column = boot[:, s][np.isfinite(boot[:, s])]
        if n == 0 or not len(column):
            out[name] = Interval(n, float("nan"), float("nan"), float("nan"), float("nan"), confidence)
            continue
        low, high = np.quantile(column, [alpha, 1.0 - alpha])
        out[name] = Interval(n, float(sums[s] / n), float(low), float(high),
                             float(np.mean(column <= 0.0)), confidence)
    return out
