"""Sessionising: gap boundaries, user mode, filters, ids, and independence from the bucket count."""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import recsys.data.sessions as sessions_mod
from recsys.config import Config, PathsConfig, SessionsConfig
from recsys.data.sessions import SESSIONS_STATS_FILE, build_sessions, session_files, sessions_schema

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)


def write_events(events_dir: Path, rows: list[tuple], user_dtype=pl.Int64, presorted: bool = False) -> None:
    """rows of (user_id, item_id, ts[, watch_seconds]) -> hive ``event_date=YYYY-MM-DD/part-0.parquet``.

    Rows are shuffled within a file, or sorted by (user, ts, item) as ingest writes them (``presorted``).
    """
    schema = {"user_id": user_dtype, "item_id": pl.Int64, "ts": pl.Datetime("us", "UTC")}
    if rows and len(rows[0]) == 4:
        schema["watch_seconds"] = pl.Float64
    frame = pl.DataFrame(rows, orient="row", schema=schema).with_columns(event_type=pl.lit("play"))
    for (day,), part in frame.group_by(pl.col("ts").dt.date(), maintain_order=True):
        out = events_dir / f"event_date={day}"
        out.mkdir(parents=True, exist_ok=True)
        if presorted:
            part = part.sort("user_id", "ts", "item_id")
        else:
            part = part.sample(fraction=1.0, shuffle=True, seed=3)
        part.write_parquet(out / "part-0.parquet")


def make_config(root: Path, **sessions) -> Config:
    base = {"min_item_support": 1, "min_length": 2, "max_length": None, "n_buckets": 3}
    return Config(paths=PathsConfig(data_root=root), sessions=SessionsConfig(**{**base, **sessions}))


def run(tmp_path: Path, rows: list[tuple], **sessions) -> tuple[pl.DataFrame, dict]:
    config = make_config(tmp_path / "data", **sessions)
    write_events(config.paths.events_dir, rows)
    stats = build_sessions(config)
    frame = pl.read_parquet(session_files(config.paths.sessions_dir)).sort("session_id")
    return frame, stats


def test_gap_boundary_is_strictly_greater_than_the_gap(tmp_path):
    rows = [
        (1, 10, T0),
        (1, 11, T0 + 30 * MIN),  # exactly the gap: same session
        (1, 12, T0 + 60 * MIN + timedelta(microseconds=1)),  # 30 min + 1 us later: new session
        (1, 13, T0 + 62 * MIN),
        (2, 10, T0 + 5 * MIN),  # another user never joins user 1's session
        (2, 11, T0 + 6 * MIN),
    ]
    frame, stats = run(tmp_path, rows, mode="gap", gap_minutes=30)
    assert frame.select("user_id", "items").rows() == [(1, [10, 11]), (1, [12, 13]), (2, [10, 11])]
    first = frame.row(0, named=True)
    assert first["start_ts"] == T0 and first["end_ts"] == T0 + 30 * MIN
    assert first["ts"] == [T0, T0 + 30 * MIN]
    assert stats["sessions"] == 3 and stats["events"] == 6 and stats["users"] == 2


def test_gap_counts_from_the_end_of_the_previous_play(tmp_path):
    # Three 50-minute episodes back to back, then a film 40 minutes after the last episode ended.
    ep = 50 * MIN
    rows = [(1, 10, T0, 3000.0), (1, 11, T0 + ep, 3000.0), (1, 12, T0 + 2 * ep + 5 * MIN, None),
            (1, 13, T0 + 2 * ep + 5 * MIN + 40 * MIN, 600.0), (1, 14, T0 + 2 * ep + 55 * MIN, 60.0)]
    frame, _ = run(tmp_path, rows, gap_minutes=30)
    # item 12 has no watch_seconds: its play counts as instantaneous, so 13 starts a new session
    assert frame["items"].to_list() == [[10, 11, 12], [13, 14]]
    frame, _ = run(tmp_path, rows, gap_minutes=30, gap_from_end=False)  # plain timestamp gaps
    assert frame["items"].to_list() == [[13, 14]]
    frame, _ = run(tmp_path, rows, gap_minutes=40)  # exactly 40 minutes of inactivity: same session
    assert frame["items"].to_list() == [[10, 11, 12, 13, 14]]


def test_user_mode_keeps_the_whole_history(tmp_path):
    rows = [(1, 10, T0), (1, 11, T0 + timedelta(days=3)), (1, 12, T0 + timedelta(days=40)), (2, 5, T0)]
    frame, stats = run(tmp_path, rows, mode="user")
    assert frame.select("user_id", "items").rows() == [(1, [10, 11, 12])]
    assert stats["sequences_too_short"] == 1  # user 2 has one event


def test_equal_timestamps_are_ordered_by_item_id(tmp_path):
    rows = [(1, 7, T0), (1, 3, T0), (1, 5, T0 + MIN), (1, 4, T0 + MIN)]
    frame, _ = run(tmp_path, rows, mode="gap")
    assert frame["items"].to_list() == [[3, 7, 4, 5]]


def test_consecutive_repeats(tmp_path):
    rows = [(1, 1, T0), (1, 1, T0 + MIN), (1, 2, T0 + 2 * MIN), (1, 1, T0 + 3 * MIN)]
    frame, stats = run(tmp_path, rows, drop_consecutive_repeats=True)
    assert frame["items"].to_list() == [[1, 2, 1]]  # only back-to-back repeats go
    assert stats["events_repeats"] == 1
    frame, _ = run(tmp_path, rows, drop_consecutive_repeats=False)
    assert frame["items"].to_list() == [[1, 1, 2, 1]]


def test_repeats_span_sessions_only_within_a_session(tmp_path):
    rows = [(1, 1, T0), (1, 2, T0 + MIN), (1, 2, T0 + 90 * MIN), (1, 3, T0 + 91 * MIN)]
    frame, _ = run(tmp_path, rows, gap_minutes=30)
    assert frame["items"].to_list() == [[1, 2], [2, 3]]


def test_item_support_applies_before_repeats_and_length(tmp_path):
    # item 9 occurs once: dropped; that makes 1 9 1 a repeat and leaves user 2 with one event.
    rows = [(1, 1, T0), (1, 9, T0 + MIN), (1, 1, T0 + 2 * MIN), (1, 2, T0 + 3 * MIN),
            (2, 2, T0), (2, 3, T0 + MIN), (3, 1, T0), (3, 3, T0 + MIN), (3, 2, T0 + 2 * MIN)]
    frame, stats = run(tmp_path, rows, min_item_support=2)
    assert frame.select("user_id", "items").rows() == [(1, [1, 2]), (2, [2, 3]), (3, [1, 3, 2])]
    assert stats["events_rare_items"] == 1 and stats["events_repeats"] == 1
    frame, stats = run(tmp_path, rows, min_item_support=3)  # items 1, 2 (3 events each) survive
    assert frame.select("user_id", "items").rows() == [(1, [1, 2]), (3, [1, 2])]
    assert stats["sequences_too_short"] == 1 and stats["items"] == 2


def test_min_and_max_length(tmp_path):
    rows = [(1, i, T0 + i * MIN) for i in range(1, 6)] + [(2, 1, T0), (2, 2, T0 + MIN)]
    frame, stats = run(tmp_path, rows, max_length=3, min_length=3)
    assert frame.select("user_id", "items").rows() == [(1, [3, 4, 5])]  # the last 3; user 2 too short
    assert frame["start_ts"][0] == T0 + 3 * MIN
    assert stats["events_truncated"] == 2 and stats["sequences_too_short"] == 1
    assert stats["length"]["max"] == 3


def random_rows(n: int = 3000, seed: int = 0) -> list[tuple]:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 60, n)
    items = rng.zipf(1.6, n) % 40
    minutes = rng.integers(0, 60 * 24 * 20, n)  # 20 days, some exact ties
    rows = {(f"u{u}", int(i), T0 + int(m) * MIN) for u, i, m in zip(users, items, minutes, strict=True)}
    return sorted(rows)


def reference_sessions(rows: list[tuple], cfg: SessionsConfig) -> list[tuple]:
    """Plain-Python sessioniser following the module docstring, to compare against.

    rows: (user, item, ts) or (user, item, ts, watch_seconds | None).
    """
    support: dict[int, int] = {}
    for row in rows:
        support[row[1]] = support.get(row[1], 0) + 1
    by_user: dict[str, list] = {}
    for user, item, ts, *watch in rows:
        by_user.setdefault(user, []).append((ts, item, (watch or [None])[0]))
    from_end = cfg.gap_from_end and bool(rows) and len(rows[0]) == 4
    out = []
    for user, events in by_user.items():
        events.sort(key=lambda e: (e[0], e[1]))
        seqs, prev_end = [], None
        for ts, item, watch in events:
            if prev_end is None or (cfg.mode == "gap" and ts - prev_end > timedelta(minutes=cfg.gap_minutes)):
                seqs.append([])
            prev_end = ts + timedelta(seconds=max(watch or 0.0, 0.0)) if from_end else ts
            seqs[-1].append((ts, item))
        for seq in seqs:
            seq = [(t, i) for t, i in seq if support[i] >= cfg.min_item_support]
            if cfg.drop_consecutive_repeats:
                seq = [e for k, e in enumerate(seq) if k == 0 or e[1] != seq[k - 1][1]]
            if cfg.max_length:
                seq = seq[-cfg.max_length:]
            if len(seq) >= cfg.min_length:
                out.append((user, [i for _, i in seq], [t for t, _ in seq]))
    return sorted(out, key=lambda r: (r[0], r[2][0]))


event_rows = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 5), st.integers(0, 600),
              st.one_of(st.none(), st.sampled_from([0.0, 60.0, 1500.0, 3600.0]))),
    min_size=1, max_size=40, unique_by=lambda r: (r[0], r[1], r[2]),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=event_rows,
    mode=st.sampled_from(["gap", "user"]),
    gap=st.sampled_from([1.0, 25.0, 60.0]),
    from_end=st.booleans(),
    repeats=st.booleans(),
    support=st.integers(1, 4),
    min_length=st.integers(2, 4),
    max_length=st.sampled_from([None, 2, 5]),
    n_buckets=st.integers(1, 4),
    presorted=st.booleans(),
)
def test_property_matches_reference(rows, mode, gap, from_end, repeats, support, min_length, max_length,
                                     n_buckets, presorted):
    rows = [(u, i, T0 + m * MIN, w) for u, i, m, w in rows]  # minutes apart; equal timestamps happen
    cfg = SessionsConfig(mode=mode, gap_minutes=gap, gap_from_end=from_end, drop_consecutive_repeats=repeats,
                         min_item_support=support, min_length=min_length, max_length=max_length,
                         n_buckets=n_buckets)
    with tempfile.TemporaryDirectory() as tmp:
        config = Config(paths=PathsConfig(data_root=Path(tmp)), sessions=cfg)
        write_events(config.paths.events_dir, rows, presorted=presorted)
        stats = build_sessions(config)
        frame = pl.read_parquet(session_files(config.paths.sessions_dir))
    got = sorted(frame.select("user_id", "items", "ts").rows(), key=lambda r: (r[0], r[2][0]))
    assert got == reference_sessions(rows, cfg)
    assert frame["session_id"].is_unique().all() and stats["sessions"] == frame.height


@pytest.mark.parametrize(("mode", "presorted"), [("gap", False), ("user", False), ("gap", True)])
def test_matches_reference_and_does_not_depend_on_buckets(tmp_path, mode, presorted):
    rows = random_rows()
    config = make_config(tmp_path / "data", mode=mode, gap_minutes=600, min_item_support=4, max_length=25)
    write_events(config.paths.events_dir, rows, user_dtype=pl.String, presorted=presorted)
    frames = []
    for n_buckets, per_pass in [(1, 10**9), (7, 10**9), (7, 500)]:  # 500: several scan passes
        config.sessions.n_buckets = n_buckets
        out = tmp_path / f"sessions-{n_buckets}-{per_pass}"
        stats = build_sessions(config, out_dir=out, events_per_pass=per_pass)
        assert len(session_files(out)) == n_buckets and (out / SESSIONS_STATS_FILE).exists()
        frames.append(pl.read_parquet(session_files(out)).sort("session_id"))
    assert frames[0].equals(frames[1]) and frames[0].equals(frames[2])
    frame = frames[0]
    assert frame["session_id"].is_unique().all()
    assert dict(frame.schema) == sessions_schema(pl.String, pl.Int64)
    assert stats["sessions"] == frame.height
    got = sorted(frame.select("user_id", "items", "ts").rows(), key=lambda r: (r[0], r[2][0]))
    assert got == reference_sessions(rows, config.sessions)
    assert (frame["start_ts"] == frame["ts"].list.first()).all()
    assert (frame["end_ts"] == frame["ts"].list.last()).all()
    # session ids are stable when run again
    again = build_sessions(config, out_dir=tmp_path / "again")
    assert again["sessions"] == frame.height
    assert pl.read_parquet(session_files(tmp_path / "again")).sort("session_id").equals(frame)


def test_rerun_replaces_output_and_a_failure_keeps_the_previous_one(tmp_path, monkeypatch):
    rows = [(1, 1, T0), (1, 2, T0 + MIN), (2, 1, T0), (2, 2, T0 + MIN)]
    config = make_config(tmp_path / "data", n_buckets=2)
    write_events(config.paths.events_dir, rows)
    build_sessions(config)
    out = config.paths.sessions_dir
    (out / "stale.txt").write_text("from an older run")
    build_sessions(config)
    assert not (out / "stale.txt").exists()
    before = pl.read_parquet(session_files(out)).sort("session_id")

    def boom(*args, **kwargs):
        raise RuntimeError("killed mid-run")

    monkeypatch.setattr(sessions_mod, "sessionise", boom)
    with pytest.raises(RuntimeError):
        build_sessions(config)
    assert pl.read_parquet(session_files(out)).sort("session_id").equals(before)
    assert sorted(p.name for p in out.parent.iterdir()) == ["events", "sessions"]  # no temp dirs left


def test_missing_or_empty_events_are_clear_errors(tmp_path):
    config = make_config(tmp_path / "data")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_sessions(config)
    config.paths.events_dir.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no Parquet files"):
        build_sessions(config)


def test_order_events_fast_path_agrees_with_the_full_sort():
    def day_file(day: int, rows: list[tuple]) -> pl.DataFrame:
        return pl.DataFrame(rows, orient="row", schema={"user_id": pl.String, "item_id": pl.Int64,
                                                          "ts": pl.Datetime("us", "UTC")})

    d1 = day_file(1, [("a", 2, T0), ("a", 1, T0 + MIN), ("b", 5, T0)])
    d2 = day_file(2, [("a", 3, T0 + 1440 * MIN), ("c", 1, T0 + 1441 * MIN)])
    runs = pl.concat([d1, d2])  # what a bucket read from two ingest files looks like
    tie_wrong = pl.concat([day_file(1, [("a", 9, T0), ("a", 1, T0)]), d2])  # equal ts, item descending
    overlap = pl.concat([d2, d1])  # files out of date order
    for frame in (runs, tie_wrong, overlap, runs.reverse()):
        for max_runs in (0, 3, 100):
            expected = frame.sort("user_id", "ts", "item_id")
            assert sessions_mod.order_events(frame, max_runs).equals(expected)
