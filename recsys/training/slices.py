"""Per-slice quality: who and what a model serves well, from the evaluator's per-target ranks.

One overall number hides a model that wins on popular films and loses every cold user. Here every
target of a split file (all of them, also those a model cannot rank) gets slice labels:

- ``history:<a>-<b>``   events before the target in its sequence (``evaluate.slices.history_edges``);
- ``item:head|torso|tail``  the target's training popularity: head items make up the first
  ``head_share`` of training events, torso the events up to ``torso_share``, tail the rest;
- ``item:new``          the target is not in the training vocabulary (no model can rank it: a miss);
- ``user:cold|known``   the user has no training sequence at all, or has one;
- ``kind:<kind>``       the catalogue's ``kind`` column (synthetic data: series vs film), when a
  ``catalogue.parquet`` is found.

A model's ranks are mapped onto these targets (targets it could not rank count as misses, like
``recall@K_all``), so two models with different vocabularies are compared target by target, which is
what the paired bootstrap of :mod:`recsys.training.significance` needs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from recsys.data.sequences import load_sequences
from recsys.data.vocab import Vocab
from recsys.schemas import ITEM_ID, ITEMS, N_CONTEXT, TRAIN_FILE, USER_ID, VOCAB_FILE
from recsys.training.significance import ALL, Interval, bootstrap_columns, bootstrap_means

if TYPE_CHECKING:
    from recsys.config import Config

log = logging.getLogger(__name__)

SLICE_K = 20  # slices report Recall/MRR/NDCG at this cutoff
SLICE_METRICS = ("recall", "mrr", "ndcg")
CATALOGUE_FILE = "catalogue.parquet"


@dataclass
class TargetTable:
    """Every target of one split file, canonical order (by row, then position), and its slice masks."""

    path: Path
    raw_flat: np.ndarray  # [T] index of the target in the file's flattened item lists
    history_len: np.ndarray  # [T] events before the target in its sequence
    slices: dict[str, np.ndarray]  # name -> bool [T]

    @property
    def n_targets(self) -> int:
        return len(self.raw_flat)


def _bucket_names(edges: Sequence[int]) -> list[tuple[str, int, int | None]]:
    """``[2, 5]`` -> [("history:1", 1, 2), ("history:2-4", 2, 5), ("history:5+", 5, None)]."""
    bounds = [1, *sorted({int(e) for e in edges if int(e) > 1})]
    out = []
    for i, lo in enumerate(bounds):
        hi = bounds[i + 1] if i + 1 < len(bounds) else None
        if hi is None:
            name = f"history:{lo}+"
        else:
            name = f"history:{lo}" if hi == lo + 1 else f"history:{lo}-{hi - 1}"
        out.append((name, lo, hi))
    return out


def popularity_buckets(counts: np.ndarray, head_share: float, torso_share: float) -> np.ndarray:
    """Bucket per vocabulary index: 0 head, 1 torso, 2 tail, by cumulative share of training events.

    Items are taken most popular first; an item belongs to the head while the events before it are
    fewer than ``head_share`` of all (so the most popular item is always head).
    """
    counts = np.asarray(counts, dtype=np.float64)
    order = np.argsort(-counts, kind="stable")
    before = np.cumsum(counts[order]) - counts[order]  # events of more popular items
    total = max(counts.sum(), 1.0)
    bucket_sorted = np.where(before < head_share * total, 0, np.where(before < torso_share * total, 1, 2))
    bucket = np.empty(len(counts), dtype=np.int64)
    bucket[order] = bucket_sorted
    return bucket


def find_catalogue(config: Config) -> Path | None:
    """``evaluate.slices.catalogue`` when set, else the first ``raw/*/catalogue.parquet`` with a kind."""
    configured = config.evaluate.slices.catalogue
    if configured is not None:
        path = configured if configured.is_absolute() else config.paths.data_root / configured
        return path if path.is_file() else None
    for path in sorted(config.paths.raw_dir.glob(f"*/{CATALOGUE_FILE}")):
        if "kind" in pl.read_parquet_schema(path):
            return path
    return None


def target_table(
    config: Config, split_dir: Path, split_file: str, *, catalogue: Path | None = None
) -> TargetTable:
    """Targets of ``split_dir/split_file`` labelled by the split's own training data (and catalogue)."""
    cfg = config.evaluate.slices
    split_dir = Path(split_dir)
    frame = pl.read_parquet(split_dir / split_file, columns=[USER_ID, ITEMS, N_CONTEXT])
    lengths = frame[ITEMS].list.len().cast(pl.Int64).to_numpy()  # [S]
    n_context = frame[N_CONTEXT].cast(pl.Int64).to_numpy()  # [S]
    starts = np.cumsum(lengths) - lengths
    pos = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)  # [N] raw position
    row = np.repeat(np.arange(frame.height, dtype=np.int64), lengths)  # [N]
    is_target = pos >= np.maximum(np.repeat(n_context, lengths), 1)
    raw_flat = np.flatnonzero(is_target)  # [T]
    target_ids = frame[ITEMS].explode().gather(raw_flat)
    history = pos[raw_flat]

    vocab = Vocab.load(split_dir / VOCAB_FILE)
    idx = vocab.index_of(target_ids)  # [T] -1: new to the model
    slices: dict[str, np.ndarray] = {}
    for name, lo, hi in _bucket_names(cfg.history_edges):
        slices[name] = (history >= lo) & (history < hi if hi is not None else True)
    bucket = popularity_buckets(vocab.counts, cfg.head_share, cfg.torso_share)
    known = idx >= 0
    item_bucket = np.where(known, bucket[np.maximum(idx, 0)], -1)
    for b, name in enumerate(("item:head", "item:torso", "item:tail")):
        slices[name] = item_bucket == b
    slices["item:new"] = ~known
    train_users = pl.read_parquet(split_dir / TRAIN_FILE, columns=[USER_ID])[USER_ID]
    users = frame[USER_ID].gather(row[raw_flat])
    cold = ~users.is_in(train_users.implode()).to_numpy()
    slices["user:cold"], slices["user:known"] = cold, ~cold
    catalogue = catalogue if catalogue is not None else find_catalogue(config)
    if catalogue is not None:
        kinds = pl.read_parquet(catalogue, columns=[ITEM_ID, "kind"])
        looked_up = target_ids.rename(ITEM_ID).cast(kinds[ITEM_ID].dtype, strict=False).to_frame().join(
            kinds, on=ITEM_ID, how="left", maintain_order="left")["kind"]
        for kind in sorted(k for k in looked_up.unique().to_list() if k is not None):
            slices[f"kind:{kind}"] = (looked_up == kind).fill_null(False).to_numpy()
    slices = {name: mask for name, mask in slices.items() if mask.any()}  # empty slices say nothing
    return TargetTable(split_dir / split_file, raw_flat, history, slices)


def ranks_over_targets(table: TargetTable, vocab: Vocab, query_ranks: np.ndarray) -> np.ndarray:
    """A model's per-query ranks (evaluator order, under ``vocab``) as ranks over every target [T].

    0 marks a target the model could not rank (unknown item, no known history): a miss.
    """
    seqs = load_sequences(table.path, vocab)  # the same queries the evaluator ranked
    seq, pos = seqs.queries()
    if len(seq) != len(query_ranks):
        raise ValueError(f"{len(query_ranks)} ranks for {len(seq)} queries of {table.path}")
    flat = seqs.offsets[seq] + pos  # [Q] index among the known items
    frame = pl.read_parquet(table.path, columns=[ITEMS])
    known_flat = np.flatnonzero(vocab.index_of(frame[ITEMS].explode()) >= 0)  # known item -> raw index
    raw = known_flat[flat]
    where = np.searchsorted(table.raw_flat, raw)
    if not np.array_equal(table.raw_flat[np.minimum(where, table.n_targets - 1)], raw):
        raise ValueError(f"queries of {table.path} do not map onto its targets")
    ranks = np.zeros(table.n_targets, dtype=np.int64)
    ranks[where] = query_ranks
    return ranks


def per_target(ranks: np.ndarray, metric: str, k: int = SLICE_K) -> np.ndarray:
    """Per-target ``recall``/``mrr``/``ndcg`` at ``k`` from ranks over targets (0 = miss) [T] float."""
    ranks = np.asarray(ranks, dtype=np.float64)
    hit = (ranks >= 1) & (ranks <= k)
    safe = np.where(hit, ranks, 1.0)
    if metric == "recall":
        return hit.astype(np.float64)
    if metric == "mrr":
        return np.where(hit, 1.0 / safe, 0.0)
    if metric == "ndcg":
        return np.where(hit, 1.0 / np.log2(safe + 1.0), 0.0)
    raise ValueError(f"unknown per-target metric {metric!r} (known: {', '.join(SLICE_METRICS)})")


def slice_reports(
    table: TargetTable,
    ranks: Mapping[str, np.ndarray],
    *,
    k: int = SLICE_K,
    confidence: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per model ``{slice: {"n", "recall@20", "mrr@20", "ndcg@20", "<metric>@20_low/_high"}}``, ``all``
    first; one bootstrap for every model and metric (ranks over targets, see ranks_over_targets)."""
    columns = {(model, metric): per_target(r, metric, k)
               for model, r in ranks.items() for metric in SLICE_METRICS}
    keys = list(columns)
    intervals = bootstrap_columns({str(i): columns[key] for i, key in enumerate(keys)}, table.slices,
                                  confidence=confidence, n_resamples=n_resamples, seed=seed)
    out: dict[str, dict[str, dict[str, Any]]] = {model: {} for model in ranks}
    for i, (model, metric) in enumerate(keys):
        for name, iv in intervals[str(i)].items():
            row = out[model].setdefault(name, {"n": iv.n})
            key = f"{metric}@{k}"
            row[key], row[f"{key}_low"], row[f"{key}_high"] = iv.mean, iv.low, iv.high
    return out


def paired_comparison(
    table: TargetTable,
    challenger: np.ndarray,
    champion: np.ndarray,
    metric: str,
    *,
    confidence: float,
    n_resamples: int,
    seed: int = 0,
) -> dict[str, Interval]:
    """Interval of challenger minus champion per target (``metric``: ``mrr@20``), overall and per slice."""
    name, _, k = metric.partition("@")
    a, b = per_target(challenger, name, int(k)), per_target(champion, name, int(k))
    return bootstrap_means(a - b, table.slices, confidence=confidence, n_resamples=n_resamples, seed=seed)


def slices_of_models(
    config: Config,
    split_dir: Path,
    split_file: str,
    ranks: Mapping[str, np.ndarray],
    vocab: Vocab,
) -> dict[str, Any]:
    """Slice reports of several models evaluated on one split (per-query ranks under ``vocab``).

    Returns ``{"models": {name: slice_report}, "slices": [names], "n_targets": T, "k": 20,
    "confidence": c}`` (plain data: JSON, MLflow, reports).
    """
    cfg = config.evaluate.slices
    t0 = time.perf_counter()
    table = target_table(config, split_dir, split_file)
    over_targets = {name: ranks_over_targets(table, vocab, r) for name, r in ranks.items()}
    models = slice_reports(table, over_targets, confidence=cfg.confidence, n_resamples=cfg.n_resamples,
                           seed=cfg.seed)
    log.info("slices of %d model(s) over %d targets, %d slices, %d resamples: %.1f s", len(models),
             table.n_targets, len(table.slices), cfg.n_resamples, time.perf_counter() - t0)
    return {"models": models, "slices": [ALL, *table.slices], "n_targets": table.n_targets, "k": SLICE_K,
            "confidence": cfg.confidence}
