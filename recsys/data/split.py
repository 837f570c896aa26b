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
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.config import Config, SplitConfig
from recsys.data.atomic_dir import fresh_tmp_dir, swap_into_place
from recsys.data.background import BackgroundWriter
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
    """Write train/valid/test/vocab parquet and ``stats.json`` to ``out_dir`` atomically; return the stats.

    Sessions files are split one at a time and appended to the output files, so memory is bounded by
    the largest sessions file (one user bucket) plus the train item column for the vocabulary. Rows keep
    the sessions files' order (bucket, then session id): deterministic without a sort.
    """
    sessions_dir = Path(sessions_dir) if sessions_dir is not None else config.paths.sessions_dir
    out_dir = Path(out_dir) if out_dir is not None else config.paths.split_dir
    started = time.perf_counter()
    files = session_files(sessions_dir)
    overview = pl.scan_parquet(files).select(
        pl.len().alias("n"), pl.col(START_TS).min().alias("t_min"), pl.col(END_TS).max().alias("t_max")
    ).collect().row(0, named=True)
    if overview["n"] == 0:
        raise ValueError(f"{sessions_dir} holds no sequences: nothing to split (check the sessions filters)")

    stats: dict[str, Any] = {"protocol": config.split.protocol}
    min_length = config.sessions.min_length
    if config.split.protocol == "temporal":
        t_min, t_max = overview["t_min"], overview["t_max"]
        valid_cut, test_cut = temporal_cutoffs(config.split, t_min, t_max)
        stats.update(time_min=_iso(t_min), time_max=_iso(t_max),
                     valid_cutoff=_iso(valid_cut), test_cutoff=_iso(test_cut))

        def cut(seqs: pl.DataFrame) -> dict[str, pl.DataFrame]:
            return temporal_split(seqs, valid_cut, test_cut, min_length)
    else:
        def cut(seqs: pl.DataFrame) -> dict[str, pl.DataFrame]:
            return leave_one_out_split(seqs, min_length)

    tmp = fresh_tmp_dir(out_dir)
    try:
        whole = _SplitCounts()
        counts = {name: _SplitCounts() for name in SPLITS}
        train_items: list[pl.Series] = []
        with _SplitWriters(tmp) as writers:
            for path in files:
                seqs = pl.read_parquet(path)
                whole.add_sequences(seqs)
                for name, frame in cut(seqs).items():
                    writers.write(name, frame)
                    counts[name].add(frame, keep_items=name != "train")
                    if name == "train":
                        train_items.append(frame[ITEMS].explode())
        if counts["train"].sequences == 0:
            raise ValueError("the split left train empty: move the cutoffs later or lower "
                             "sessions.min_length")
        vocab = Vocab.from_items(pl.concat(train_items))
        del train_items
        vocab.save(tmp / VOCAB_FILE)

        stats["sequences"] = whole.sequence_stats()
        stats["vocab_size"] = len(vocab)
        stats["splits"] = {
            name: counts[name].summary(vocab if name != "train" else None) for name in SPLITS
        }
        sessions_stage = read_json(sessions_dir / SESSIONS_STATS_FILE) or {}
        ingest = sessions_stage.pop("ingest", None)  # the report the sessions stage saw beside its events
        stats["sessions_stage"] = sessions_stage or None
        stats["sequences_built"] = sequences_built(config, sessions_stage, stats)
        stats["ingest"] = ingest or find_ingest_report(config.paths.events_dir)
        elapsed = time.perf_counter() - started
        n_events = stats["sequences"]["events"]
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


def sequences_built(config: Config, sessions_stage: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
    """How these sequences were built: what later stages (the recommendation policy) read, never a flag
    repeated by hand. The sessions mode is the one the sessions stage recorded (the config's when the
    sessions directory holds no record)."""
    sessions = config.sessions.model_dump(mode="json")
    if sessions_stage.get("mode"):
        sessions["mode"] = sessions_stage["mode"]
    return {
        "sessions": sessions,
        "protocol": config.split.protocol,
        "valid_cutoff": stats.get("valid_cutoff"),
        "test_cutoff": stats.get("test_cutoff"),
    }


class _SplitWriters:
    """One Parquet writer per split file, appended to one sessions file at a time (in the background)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.background = BackgroundWriter(max_pending=3)

    def write(self, name: str, frame: pl.DataFrame) -> None:
        self.background.submit(self._write, name, frame.to_arrow())

    def _write(self, name: str, table: pa.Table) -> None:
        if name not in self.writers:
            path = self.out_dir / _FILES[name]
            # No dictionary encoding: on these id and timestamp lists it costs time and even size
            # (measured on 10M events, train: 0.66 -> 0.38 s CPU to write, 80 -> 69 MB).
            self.writers[name] = pq.ParquetWriter(path, table.schema, compression="zstd",
                                                  use_dictionary=False)
        self.writers[name].write_table(table)

    def __enter__(self) -> _SplitWriters:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            self.background.__exit__(exc_type, *exc)
        finally:
            for writer in self.writers.values():
                writer.close()


class _SplitCounts:
    """Counts of one split, accumulated over sessions files; unseen items are resolved at the end."""

    def __init__(self) -> None:
        self.sequences = self.events = self.targets = self.context_events = 0
        self.users: list[pl.Series] = []
        self.lengths: list[np.ndarray] = []  # input sequences only
        self.items: list[pl.Series] = []  # distinct items, input sequences only
        self.target_items: list[pl.Series] = []  # every target, for the unseen counts
        self.context_items: list[pl.Series] = []

    def add(self, frame: pl.DataFrame, keep_items: bool = False) -> None:
        lengths = frame[ITEMS].list.len().to_numpy().astype(np.int64)
        n_context = frame[N_CONTEXT].to_numpy().astype(np.int64)
        flat = frame[ITEMS].explode()
        position = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        is_target = position >= np.repeat(np.maximum(n_context, 1), lengths)
        self.sequences += frame.height
        self.events += int(lengths.sum())
        self.targets += int(is_target.sum())
        self.context_events += int(np.minimum(n_context, lengths).sum())
        self.users.append(frame[USER_ID].unique())
        if keep_items:
            self.target_items.append(flat.filter(pl.Series(is_target)))
            self.context_items.append(flat.filter(pl.Series(~is_target)))

    def add_sequences(self, frame: pl.DataFrame) -> None:
        """Only what :meth:`sequence_stats` needs, for the input sequences."""
        lengths = frame[ITEMS].list.len().to_numpy().astype(np.int64)
        self.sequences += frame.height
        self.events += int(lengths.sum())
        self.users.append(frame[USER_ID].unique())
        self.lengths.append(lengths)
        self.items.append(frame[ITEMS].explode().unique())

    def _n_unique(self, parts: list[pl.Series]) -> int:
        return pl.concat(parts).n_unique() if parts else 0

    def sequence_stats(self) -> dict[str, Any]:
        return {
            "sequences": self.sequences,
            "events": self.events,
            "users": self._n_unique(self.users),
            "items": self._n_unique(self.items),
            "length": length_summary(np.concatenate(self.lengths) if self.lengths else np.zeros(0)),
        }

    def summary(self, vocab: Vocab | None) -> dict[str, Any]:
        """Counts of the split; ``vocab`` None (train: its items are the vocabulary) skips the look-ups."""
        unseen_targets = unseen_items = unseen_context = 0
        if vocab is not None and self.target_items:
            targets = pl.concat(self.target_items)
            unseen = pl.Series(vocab.index_of(targets) < 0)
            unseen_targets, unseen_items = int(unseen.sum()), targets.filter(unseen).n_unique()
            unseen_context = int((vocab.index_of(pl.concat(self.context_items)) < 0).sum())
        return {
            "sequences": self.sequences,
            "users": self._n_unique(self.users),
            "events": self.events,
            "targets": self.targets,
            "context_events": self.context_events,
            "unseen_targets": unseen_targets,
            "unseen_target_fraction": round(unseen_targets / self.targets, 6) if self.targets else 0.0,
            "unseen_target_items": unseen_items,
            "unseen_context_events": unseen_context,
        }


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


def _iso(t: Any) -> str:
    return t.isoformat() if hasattr(t, "isoformat") else str(t)

