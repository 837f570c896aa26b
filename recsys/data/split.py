"""Sequences -> train / valid / test files, the training vocabulary and the data stats.

Every output row is a sequence (the sessions columns) plus ``n_context``: its first ``n_context`` items are
history only and every later position ``p >= max(n_context, 1)`` is a next-item target (CONTRACTS.md).

Temporal protocol (primary): two global cutoffs, ``valid_cutoff < test_cutoff``.
- train: each sequence's events before ``valid_cutoff`` (a time-ordered prefix), ``n_context = 0``;
  nothing at or after ``valid_cutoff`` ever enters train;
- valid: each sequence with an event in ``[valid_cutoff, test_cutoff)``, cut before ``test_cutoff``,
  with its events before ``valid_cutoff`` as context;
- test: each sequence with an event at or after ``test_cutoff``, whole, with its earlier events as context.

Leave-one-out (literature comparison): train = sequence minus its last 2 items; valid = minus the last item
(one target); test = whole sequence (the last item is the one target).

Sequences too short to hold a target are left out (train keeps prefixes of at least
``sessions.min_length`` items). Targets on items that never occur in train cannot be ranked: they are
counted (``unseen_targets``) and kept in the files, so the loader reports them too.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.config import Config, SplitConfig
from recsys.data.atomic_dir import fresh_tmp_dir, swap_into_place
from recsys.data.sessions import SESSIONS_STATS_FILE, length_summary, session_files
from recsys.data.stats import find_ingest_report, read_json
from recsys.data.vocab import Vocab
from recsys.schemas import (
    END_TS,
    ITEM_TS,
    ITEMS,
    N_CONTEXT,
    SESSION_ID,
    START_TS,
    STATS_FILE,
    TEST_FILE,
    TRAIN_FILE,
    USER_ID,
    VALID_FILE,
    VOCAB_FILE,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
_FILES = {"train": TRAIN_FILE, "valid": VALID_FILE, "test": TEST_FILE}


def split_sessions(
    config: Config, sessions_dir: Path | None = None, out_dir: Path | None = None
) -> dict[str, Any]:
    """Write train/valid/test/vocab parquet and ``stats.json`` to ``out_dir`` atomically; return the stats."""
    sessions_dir = Path(sessions_dir) if sessions_dir is not None else config.paths.sessions_dir
    out_dir = Path(out_dir) if out_dir is not None else config.paths.split_dir
    started = time.perf_counter()
    # Row order: the sessions files' (bucket, then session id): deterministic without a sort.
    seqs = pl.read_parquet(session_files(sessions_dir))
    if seqs.height == 0:
        raise ValueError(f"{sessions_dir} holds no sequences: nothing to split (check the sessions filters)")
    n_events = int(seqs[ITEMS].list.len().sum())

    stats: dict[str, Any] = {"protocol": config.split.protocol}
    if config.split.protocol == "temporal":
        t_min, t_max = seqs[START_TS].min(), seqs[END_TS].max()
        valid_cut, test_cut = temporal_cutoffs(config.split, t_min, t_max)  # type: ignore[arg-type]
        parts = temporal_split(seqs, valid_cut, test_cut, config.sessions.min_length)
        stats.update(time_min=_iso(t_min), time_max=_iso(t_max),
                     valid_cutoff=_iso(valid_cut), test_cutoff=_iso(test_cut))
    else:
        parts = leave_one_out_split(seqs, config.sessions.min_length)
    if parts["train"].height == 0:
        raise ValueError("the split left train empty: move the cutoffs later or lower sessions.min_length")
    vocab = Vocab.from_items(parts["train"][ITEMS].explode())

    stats["sequences"] = {
        "sequences": seqs.height,
        "events": n_events,
        "users": seqs[USER_ID].n_unique(),
        "items": int(seqs[ITEMS].explode().n_unique()),
        "length": length_summary(seqs[ITEMS].list.len().to_numpy()),
    }
    stats["vocab_size"] = len(vocab)
    stats["splits"] = {
        name: split_summary(frame, vocab, is_train=name == "train") for name, frame in parts.items()
    }
    stats["sessions_stage"] = read_json(sessions_dir / SESSIONS_STATS_FILE)
    stats["ingest"] = (stats["sessions_stage"] or {}).get("ingest") or find_ingest_report(
        config.paths.events_dir
    )
    tmp = fresh_tmp_dir(out_dir)
    try:
        for name, frame in parts.items():
            frame.write_parquet(tmp / _FILES[name])
        vocab.save(tmp / VOCAB_FILE)
        elapsed = time.perf_counter() - started
        stats["seconds"] = round(elapsed, 3)
        stats["events_per_second"] = round(n_events / elapsed) if elapsed > 0 else None
        (tmp / STATS_FILE).write_text(json.dumps(stats, indent=2, default=str))
        swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("split (%s): %s -> %s in %.1f s", stats["protocol"],
             {k: v["sequences"] for k, v in stats["splits"].items()}, out_dir, elapsed)
    return stats


def temporal_cutoffs(cfg: SplitConfig, t_min: datetime, t_max: datetime) -> tuple[datetime, datetime]:
    """(valid_cutoff, test_cutoff) from the config and the data's time range [t_min, t_max]."""
    span = t_max - t_min
    if cfg.test_cutoff is not None:
        test_cut = cfg.test_cutoff if cfg.test_cutoff.tzinfo else cfg.test_cutoff.replace(tzinfo=UTC)
    elif cfg.test_days is not None:
        test_cut = t_max - timedelta(days=cfg.test_days)
    else:
        assert cfg.test_fraction is not None  # guaranteed by SplitConfig's validator
        test_cut = t_max - span * cfg.test_fraction
    if cfg.valid_days is not None:
        valid_cut = test_cut - timedelta(days=cfg.valid_days)
    else:
        assert cfg.valid_fraction is not None
        valid_cut = test_cut - span * cfg.valid_fraction
    if not t_min < valid_cut < test_cut <= t_max:
        raise ValueError(
            f"split cutoffs valid={valid_cut.isoformat()} test={test_cut.isoformat()} must satisfy "
            f"{t_min.isoformat()} < valid < test <= {t_max.isoformat()} (the data's time range): "
            "adjust split.test_* / split.valid_*"
        )
    return valid_cut, test_cut


def temporal_split(
    seqs: pl.DataFrame, valid_cut: datetime, test_cut: datetime, min_length: int
) -> dict[str, pl.DataFrame]:
    """Cut every time-ordered sequence at the two cutoffs (see the module docstring)."""
    n_before_valid, n_before_test = _count_before(seqs[ITEM_TS], [valid_cut, test_cut])
    frame = seqs.with_columns(
        _nv=pl.Series(n_before_valid), _nt=pl.Series(n_before_test), _len=pl.col(ITEMS).list.len()
    )
    train = _prefix(frame.filter(pl.col("_nv") >= min_length), pl.col("_nv"), pl.lit(0))
    valid = _prefix(
        frame.filter(pl.col("_nt") > pl.max_horizontal(pl.col("_nv"), 1)), pl.col("_nt"), pl.col("_nv")
    )
    test = _prefix(frame.filter(pl.col("_len") > pl.max_horizontal(pl.col("_nt"), 1)), None, pl.col("_nt"))
    return {"train": train, "valid": valid, "test": test}


def leave_one_out_split(seqs: pl.DataFrame, min_length: int) -> dict[str, pl.DataFrame]:
    """Per sequence: the last item is the test target, the one before it the validation target."""
    frame = seqs.with_columns(_len=pl.col(ITEMS).list.len().cast(pl.Int64))
    n = pl.col("_len")
    return {
        "train": _prefix(frame.filter(n - 2 >= min_length), n - 2, pl.lit(0)),
        "valid": _prefix(frame.filter(n >= 3), n - 1, n - 2),
        "test": _prefix(frame.filter(n >= 2), None, n - 1),
    }


def _prefix(frame: pl.DataFrame, keep: pl.Expr | None, n_context: pl.Expr) -> pl.DataFrame:
    """Each row's first ``keep`` items and timestamps (None: all) with ``n_context``; end_ts follows."""
    columns = [pl.col(END_TS), pl.col(ITEMS), pl.col(ITEM_TS)]
    if keep is not None:
        columns = [pl.col(ITEM_TS).list.get(keep - 1).alias(END_TS), pl.col(ITEMS, ITEM_TS).list.head(keep)]
    return frame.select(SESSION_ID, USER_ID, START_TS, *columns, n_context.cast(pl.Int32).alias(N_CONTEXT))


def _count_before(ts_lists: pl.Series, cutoffs: list[datetime]) -> list[np.ndarray]:
    """Per row and cutoff, how many timestamps of the (time-ordered) list are < cutoff: [S] int64 each."""
    lengths = ts_lists.list.len().to_numpy().astype(np.int64)
    flat = ts_lists.explode()
    if len(flat) != int(lengths.sum()):  # an empty list explodes to one null; sessions never have one
        raise ValueError("sequences must not be empty")
    flat_us = flat.dt.cast_time_unit("us").to_physical().to_numpy()
    ends = np.cumsum(lengths)
    counts = []
    for cutoff in cutoffs:
        before = flat_us < _epoch_us(cutoff)
        running = np.concatenate([[0], np.cumsum(before, dtype=np.int64)])
        counts.append(running[ends] - running[ends - lengths])
    return counts


def _epoch_us(t: datetime) -> int:
    t = t if t.tzinfo else t.replace(tzinfo=UTC)
    delta = t - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def split_summary(frame: pl.DataFrame, vocab: Vocab, is_train: bool = False) -> dict[str, Any]:
    """Sequences, events, targets and unseen-item counts of one split file's frame."""
    lengths = frame[ITEMS].list.len().to_numpy().astype(np.int64)
    n_context = frame[N_CONTEXT].to_numpy().astype(np.int64)
    flat = frame[ITEMS].explode()
    position = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    is_target = position >= np.repeat(np.maximum(n_context, 1), lengths)
    # train items are the vocabulary by construction: skip the look-up there
    known = np.ones(len(flat), dtype=bool) if is_train else vocab.index_of(flat) >= 0
    targets = int(is_target.sum())
    unseen_targets = int((is_target & ~known).sum())
    return {
        "sequences": frame.height,
        "users": frame[USER_ID].n_unique(),
        "events": int(lengths.sum()),
        "targets": targets,
        "context_events": int(np.minimum(n_context, lengths).sum()),
        "unseen_targets": unseen_targets,
        "unseen_target_fraction": round(unseen_targets / targets, 6) if targets else 0.0,
        "unseen_target_items": int(flat.filter(pl.Series(is_target & ~known)).n_unique()),
        "unseen_context_events": int((~is_target & ~known).sum()),
    }


def _iso(t: Any) -> str:
    return t.isoformat() if hasattr(t, "isoformat") else str(t)

