"""Full-catalogue next-item evaluation: one code path for training, promotion, benchmarks and the CLI.

Every query (a target position of a :class:`SequenceSet`) is ranked against the whole catalogue, a
chunk of queries at a time on the device so that a million queries times 100k items fit in memory.

Ties are counted conservatively: the target's rank is the number of items scoring >= its score, the
target included, so a model that scores everything equally ranks every target last, never first.

Every quantity is accumulated as an integer histogram (queries per rank, recommendations per item) and
turned into metrics once at the end, so the results are bit-identical for any ``chunk_size``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from recsys.data.sequences import SequenceSet, load_sequences
from recsys.data.vocab import Vocab
from recsys.model.policy import Policy, apply_policy, resolve_policy
from recsys.schemas import TEST_FILE, TRAIN_FILE, VALID_FILE, VOCAB_FILE
from recsys.training.protocol import HistoryAware, Recommender

if TYPE_CHECKING:
    from recsys.config import Config

log = logging.getLogger(__name__)

SPLIT_FILES = {"train": TRAIN_FILE, "valid": VALID_FILE, "test": TEST_FILE}
# Counts that SequenceSet.dropped may hold for targets that exist in the data but cannot be ranked:
# the target item is not in the model's vocabulary, or no history item before it is.
LOST_TARGET_KEYS = ("unseen_target", "no_history")


def target_counts(metrics: dict[str, float]) -> dict[str, int]:
    """``n_targets`` = ranked (``n_queries``) + every named reason a target was not ranked."""
    counts = {"ranked": int(metrics.get("n_queries", 0))}
    counts.update({k: int(metrics.get(k, 0)) for k in LOST_TARGET_KEYS})
    return {"n_targets": sum(counts.values()), **counts}


def target_line(metrics: dict[str, float]) -> str:
    """One line saying how every target was counted, e.g. ``7,412 targets = 7,404 ranked + 8 no history``."""
    c = target_counts(metrics)
    parts = [f"{c['ranked']:,} ranked"] + [f"{c[k]:,} {k.replace('_', ' ')}" for k in LOST_TARGET_KEYS]
    return f"{c['n_targets']:,} targets = " + " + ".join(parts)


def history_pairs(seqs: SequenceSet, seq: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, item) pairs of every history item of a chunk of queries, vectorised.

    Row ``r`` is query ``(seq[r], pos[r])``; its history is ``items[offsets[seq]:offsets[seq]+pos]``.
    Items repeated in a history give repeated pairs, harmless for masking.
    """
    lengths = pos.astype(np.int64)  # [b] history length of each query
    total = int(lengths.sum())
    rows = np.repeat(np.arange(len(seq), dtype=np.int64), lengths)  # [total]
    within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    flat = np.repeat(seqs.offsets[seq], lengths) + within  # [total] flat index into items
    return rows, seqs.items[flat]


def count_at_least(scores: torch.Tensor, threshold: torch.Tensor, block_cells: int = 1 << 23) -> torch.Tensor:
    """Per row, the number of scores >= ``threshold`` ([b, n], [b, 1] -> int64 [b]).

    Counted over column blocks so the temporary mask stays small (a full [b, n] mask plus its integer
    copy would double the chunk's memory), summing uint8 with an int32 accumulator (about 3x faster on
    CPU than summing a bool mask into int64).
    """
    b, n = scores.shape
    width = max(1024, block_cells // max(b, 1))
    count = torch.zeros(b, dtype=torch.int32, device=scores.device)
    for lo in range(0, n, width):
        count += (scores[:, lo : lo + width] >= threshold).view(torch.uint8).sum(dim=1, dtype=torch.int32)
    return count.long()


def canonical_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` (values, item indices) per row, ties broken towards the lower item index.

    ``torch.topk`` picks arbitrarily among equal scores, which would make coverage depend on the chunk
    size; here the order is (score descending, index ascending) so every row's list is well defined.
    Rows where an item outside the list ties with the k-th value (seen from the (k+1)-th value; rare for
    trained models) fall back to a stable full sort. Masked (-inf) entries are never ambiguous: they are
    not recommendations.
    """
    n = scores.shape[1]
    vals, idx = torch.topk(scores, min(k + 1, n), dim=1)  # [b, k+1]
    if k < n:
        ambiguous = ((vals[:, k] == vals[:, k - 1]) & (vals[:, k - 1] > -math.inf)).nonzero().squeeze(1)
        vals, idx = vals[:, :k], idx[:, :k]  # [b, k]
    else:
        ambiguous = torch.empty(0, dtype=torch.int64, device=scores.device)
    idx, perm = torch.sort(idx, dim=1)  # index ascending ...
    vals = vals.gather(1, perm)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices  # ... then score descending
    idx, vals = idx.gather(1, order), vals.gather(1, order)
    if ambiguous.numel():
        full_vals, full_idx = torch.sort(scores[ambiguous], dim=1, descending=True, stable=True)
        vals[ambiguous] = full_vals[:, :k]
        idx[ambiguous] = full_idx[:, :k]
    return vals, idx


def _own(scores: torch.Tensor) -> torch.Tensor:
    """A float32 tensor safe to modify in place (views of shared rows are copied)."""
    scores = scores.float()
    if scores._base is not None or not scores.is_contiguous():
        scores = scores.clone()
    return scores


def evaluate_recommender(
    rec: Recommender,
    seqs: SequenceSet,
    *,
    cutoffs: Sequence[int] = (1, 5, 10, 20),
    policy: Policy | None = None,
    exclude_seen: bool | None = None,
    chunk_size: int,
    device: str | torch.device = "cpu",
    item_popularity: np.ndarray | None = None,
    ranks_out: np.ndarray | None = None,
) -> dict[str, float]:
    """Rank every query's target against the full catalogue under ``policy``; Recall/MRR/NDCG, coverage.

    ``policy`` is the model's recommendation policy (``exclude_seen`` is the shorthand for plain history
    masking on/off without series). Returns ``recall@K`` (= HitRate@K), ``mrr@K``, ``ndcg@K``, each over
    EVERY target of the split: the ones that could not be ranked (``seqs.dropped``: ``unseen_target``,
    ``no_history``) count as misses, so the figure is the same whatever the model's vocabulary;
    ``coverage@K`` (distinct recommended items / n_items), ``popularity@K`` (mean training count of the
    recommended items; only with ``item_popularity``), ``n_targets``, ``n_queries`` (the ranked ones) and
    the ``seqs.dropped`` counts: ``n_targets = n_queries + unseen_target + no_history``.

    ``ranks_out`` (int64 [Q], canonical query order), when given, receives every query's exact rank
    (``n_items + 1`` for a masked target): per-target values for slices and paired tests
    (recsys.training.slices). Filled chunk by chunk, so it too is independent of ``chunk_size``.
    """
    if policy is None:
        if exclude_seen is None:
            raise ValueError("evaluate_recommender needs a policy (or exclude_seen)")
        policy = Policy.masking(exclude_seen)
    cutoffs = sorted({int(k) for k in cutoffs})
    if not cutoffs or cutoffs[0] < 1:
        raise ValueError(f"cutoffs must be positive integers, got {cutoffs}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device = torch.device(device)
    n_items = int(rec.n_items)
    max_k = cutoffs[-1]
    list_k = min(max_k, n_items)  # recommendation lists cannot be longer than the catalogue

    seq, pos = seqs.queries()
    targets = seqs.items[seqs.offsets[seq] + pos]  # [Q]
    n_queries = len(seq)
    states = rec.encode_queries(seqs)  # [Q, D]
    history_aware = isinstance(rec, HistoryAware) and rec.uses_history
    if states.shape[0] != n_queries:
        raise ValueError(f"{rec.name}: encode_queries gave {states.shape[0]} states for {n_queries} queries")
    if ranks_out is not None and ranks_out.shape != (n_queries,):
        raise ValueError(f"ranks_out has shape {ranks_out.shape}, want ({n_queries},)")

    rank_hist = torch.zeros(max_k + 2, dtype=torch.int64, device=device)  # queries per rank 0..max_k+1
    rec_counts = torch.zeros((len(cutoffs), n_items), dtype=torch.int64, device=device)  # [C, n_items]
    for lo in range(0, n_queries, chunk_size):
        hi = min(lo + chunk_size, n_queries)
        scores = _own(rec.score(states[lo:hi].to(device)))  # [b, n_items]
        if scores.shape != (hi - lo, n_items):
            raise ValueError(f"{rec.name}: score gave shape {tuple(scores.shape)}, want {(hi - lo, n_items)}")
        if policy.exclude != "none" or policy.continues or history_aware:
            rows, cols = history_pairs(seqs, seq[lo:hi], pos[lo:hi])
            rows_t, cols_t = torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device)
            apply_policy(scores, rows_t, cols_t, policy,
                         history_bias=rec.add_history_bias if history_aware else None)

        tgt = torch.from_numpy(targets[lo:hi]).to(device)  # [b]
        tgt_score = scores.gather(1, tgt[:, None])  # [b, 1]
        rank = count_at_least(scores, tgt_score)  # [b] conservative: ties rank ahead of the target
        rank[tgt_score[:, 0] == -math.inf] = n_items + 1  # a masked target is a miss
        if ranks_out is not None:
            ranks_out[lo:hi] = rank.cpu().numpy()

        vals, idx = canonical_topk(scores, list_k)  # [b, list_k]
        if torch.isnan(vals[:, 0]).any():  # topk ranks NaN above everything: one check covers the row
            raise ValueError(f"{rec.name}: NaN scores for queries {lo}..{hi - 1}")
        rank_hist += torch.bincount(rank.clamp(max=max_k + 1), minlength=max_k + 2)
        recommendable = vals > -math.inf  # masked items never count as recommended
        for c, k in enumerate(cutoffs):
            kk = min(k, list_k)
            rec_counts[c] += torch.bincount(idx[:, :kk][recommendable[:, :kk]], minlength=n_items)

    return _metrics(
        rank_hist.cpu().numpy(), rec_counts.cpu().numpy(), cutoffs, n_queries, n_items, seqs.dropped,
        item_popularity,
    )


def _metrics(
    rank_hist: np.ndarray,
    rec_counts: np.ndarray,
    cutoffs: list[int],
    n_queries: int,
    n_items: int,
    dropped: dict[str, int],
    item_popularity: np.ndarray | None,
) -> dict[str, float]:
    """Metrics from the integer histograms; the order of summation is fixed, so chunking cannot matter."""
    ranks = np.arange(len(rank_hist), dtype=np.float64)
    n_all = n_queries + sum(int(dropped.get(key, 0)) for key in LOST_TARGET_KEYS)  # every target
    if n_all == 0:
        log.warning("no targets to evaluate: every metric is reported as 0")
    out: dict[str, float] = {}
    for c, k in enumerate(cutoffs):
        hits = rank_hist[1 : k + 1].astype(np.float64)  # queries at ranks 1..k
        r = ranks[1 : k + 1]
        out[f"recall@{k}"] = float(hits.sum() / n_all) if n_all else 0.0
        out[f"mrr@{k}"] = float((hits / r).sum() / n_all) if n_all else 0.0
        out[f"ndcg@{k}"] = float((hits / np.log2(r + 1)).sum() / n_all) if n_all else 0.0
        out[f"coverage@{k}"] = float((rec_counts[c] > 0).sum() / n_items) if n_items else 0.0
        if item_popularity is not None:
            total = rec_counts[c].sum()
            weighted = float(rec_counts[c].astype(np.float64) @ np.asarray(item_popularity, np.float64))
            out[f"popularity@{k}"] = weighted / total if total else 0.0
    out["n_targets"] = n_all
    out["n_queries"] = n_queries
    for key in LOST_TARGET_KEYS:
        out[key] = int(dropped.get(key, 0))
    for key, value in dropped.items():
        out[key] = int(value)
    return out


def load_split(
    split_dir: Path, split: str, vocab: Vocab | None = None
) -> tuple[Vocab, SequenceSet, SequenceSet]:
    """(vocab, train, eval) sequences of a split directory; ``vocab`` defaults to the split's own."""
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
    split_dir = Path(split_dir)
    for name in (SPLIT_FILES[split], TRAIN_FILE) + (() if vocab is not None else (VOCAB_FILE,)):
        if not (split_dir / name).exists():
            raise FileNotFoundError(f"{split_dir / name} is missing: run the split stage first")
    vocab = vocab if vocab is not None else Vocab.load(split_dir / VOCAB_FILE)
    train = load_sequences(split_dir / TRAIN_FILE, vocab)
    evaluated = load_sequences(split_dir / SPLIT_FILES[split], vocab)
    return vocab, train, evaluated


def evaluate_all(
    config: Config,
    split_dir: Path | None,
    recommenders: dict[str, Recommender],
    *,
    split: str = "test",
    baselines: bool = True,
    vocab: Vocab | None = None,
    device: str | torch.device = "cpu",
    ranks: dict[str, np.ndarray] | None = None,
    policy: Policy | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate ``recommenders`` and (by default) both baselines on one split: rows of the comparison table.

    The baselines are fitted on the split's training sequences. Rows keep the order: the given
    recommenders, then item-kNN, then most-popular. ``vocab`` (e.g. a checkpoint's) replaces the split's
    vocabulary when the model was trained with its own. ``policy`` is the model's stored one (every row
    is ranked under it); None resolves the config's policy against the split (baselines only).
    ``ranks``, when given, receives each model's per-query ranks (``evaluate_recommender``'s
    ``ranks_out``), keyed like the rows.
    """
    from recsys.training.baselines import fit_baselines

    split_dir = Path(split_dir) if split_dir is not None else config.paths.split_dir
    if vocab is not None and (split_dir / VOCAB_FILE).exists():
        split_vocab = Vocab.load(split_dir / VOCAB_FILE)
        if not split_vocab.item_ids.equals(vocab.item_ids):
            log.warning("model vocabulary differs from %s: evaluating with the model's (%d vs %d items)",
                        split_dir / VOCAB_FILE, len(vocab), len(split_vocab))
    vocab, train, evaluated = load_split(split_dir, split, vocab)
    n_items = len(vocab)
    models: dict[str, Recommender] = dict(recommenders)
    if baselines:
        models.update(fit_baselines(config, train, n_items))
    if policy is None:
        policy = resolve_policy(config, vocab, split_dir)
    rows: dict[str, dict[str, float]] = {}
    for name, rec in models.items():
        if rec.n_items != n_items:
            raise ValueError(f"{name} scores {rec.n_items} items but the vocabulary has {n_items}")
        log.info("evaluating %s on %s (%d sequences, policy %s)", name, split, evaluated.n_sequences,
                 policy.describe())
        out = None if ranks is None else np.zeros(len(evaluated.queries()[0]), dtype=np.int64)
        rows[name] = evaluate_recommender(
            rec, evaluated, cutoffs=config.evaluate.cutoffs, policy=policy,
            chunk_size=config.evaluate.chunk_size, device=device, item_popularity=vocab.counts,
            ranks_out=out,
        )
        if ranks is not None:
            ranks[name] = out
        log.info("%s on %s: %s", name, split, target_line(rows[name]))
    return rows
