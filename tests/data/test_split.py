"""Split: temporal cutoffs and invariants, leave-one-out, train-only vocabulary, unseen counts, stats, CLI."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from rich.console import Console
from test_sessions import write_events
from typer.testing import CliRunner

from recsys.config import Config, PathsConfig, SessionsConfig, SplitConfig
from recsys.data.sequences import load_sequences
from recsys.data.sessions import sessions_schema
from recsys.data.split import split_sessions, temporal_cutoffs
from recsys.data.stats import print_stats
from recsys.data.vocab import Vocab

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def day(x: float) -> datetime:
    return T0 + timedelta(days=x)


def write_sessions(sessions_dir: Path, seqs: list[tuple[str, list[int], list[datetime]]]) -> None:
    sessions_dir.mkdir(parents=True, exist_ok=True)
    rows = [
        {"session_id": k, "user_id": user, "start_ts": ts[0], "end_ts": ts[-1], "items": items, "ts": ts}
        for k, (user, items, ts) in enumerate(seqs)
    ]
    pl.DataFrame(rows, schema=sessions_schema(pl.String, pl.Int64)).write_parquet(
        sessions_dir / "part-0000.parquet"
    )


def run_split(tmp_path: Path, seqs, **split) -> tuple[dict, Path, Config]:
    config = Config(paths=PathsConfig(data_root=tmp_path / "data"), split=SplitConfig(**split))
    write_sessions(config.paths.sessions_dir, seqs)
    stats = split_sessions(config)
    return stats, config.paths.split_dir, config


def read(split_dir: Path, name: str) -> list[tuple]:
    return pl.read_parquet(split_dir / f"{name}.parquet").select("user_id", "items", "n_context").rows()


HAND = [
    ("a", [1, 2, 3, 4, 5], [day(1), day(2), day(8.5), day(9.5), day(10.5)]),
    ("b", [3, 4, 10, 5, 9, 8], [day(1), day(2), day(3), day(4), day(5), day(6)]),
    ("c", [8, 9], [day(9.2), day(9.3)]),  # starts after the test cutoff: its first event is context
    ("d", [1, 10], [day(2), day(8.2)]),  # train prefix of one item is too short to keep
    ("e", [1, 11], [day(3), day(9.5)]),  # 11 never occurs in train
]


def test_temporal_split_by_hand(tmp_path):
    stats, split_dir, _ = run_split(
        tmp_path, HAND, protocol="temporal", test_cutoff=day(9), valid_days=1.0
    )
    assert stats["valid_cutoff"] == day(8).isoformat() and stats["test_cutoff"] == day(9).isoformat()
    assert read(split_dir, "train") == [("a", [1, 2], 0), ("b", [3, 4, 10, 5, 9, 8], 0)]
    assert read(split_dir, "valid") == [("a", [1, 2, 3], 2), ("d", [1, 10], 1)]
    assert read(split_dir, "test") == [("a", [1, 2, 3, 4, 5], 3), ("c", [8, 9], 0), ("e", [1, 11], 1)]
    valid = pl.read_parquet(split_dir / "valid.parquet")
    assert valid["end_ts"].to_list() == [day(8.5), day(8.2)]  # end_ts follows the cut
    assert valid["n_context"].dtype == pl.Int32

    vocab = Vocab.load(split_dir / "vocab.parquet")
    assert sorted(vocab.item_ids.to_list()) == [1, 2, 3, 4, 5, 8, 9, 10]  # train items only
    s = stats["splits"]
    assert (s["train"]["targets"], s["valid"]["targets"], s["test"]["targets"]) == (6, 2, 4)
    assert (s["valid"]["unseen_targets"], s["test"]["unseen_targets"]) == (0, 1)
    assert s["test"]["unseen_target_items"] == 1

    # The loader sees exactly the intended queries.
    test = load_sequences(split_dir / "test.parquet", vocab)
    got = vocab.item_ids.gather(test.targets()).to_list()
    assert got == [4, 5, 9] and test.dropped["unseen_target"] == 1
    seq, pos = test.queries()
    assert [int(test.items[test.offsets[q] + p - 1]) for q, p in zip(seq, pos, strict=True)] == [
        int(i) for i in vocab.index_of(pl.Series([3, 4, 8]))
    ]  # the item just before each target
    valid_seqs = load_sequences(split_dir / "valid.parquet", vocab)
    assert vocab.item_ids.gather(valid_seqs.targets()).to_list() == [3, 10]
    train = load_sequences(split_dir / "train.parquet", vocab)
    assert len(train.targets()) == s["train"]["targets"]


def test_leave_one_out_by_hand(tmp_path):
    seqs = [("a", [1, 2, 3, 4], [day(i) for i in range(4)]),
            ("b", [5, 6], [day(1), day(2)]),
            ("c", [7, 8, 9], [day(1), day(2), day(3)])]
    stats, split_dir, _ = run_split(tmp_path, seqs, protocol="leave_one_out")
    assert read(split_dir, "train") == [("a", [1, 2], 0)]
    assert read(split_dir, "valid") == [("a", [1, 2, 3], 2), ("c", [7, 8], 1)]
    assert read(split_dir, "test") == [("a", [1, 2, 3, 4], 3), ("b", [5, 6], 1), ("c", [7, 8, 9], 2)]
    assert stats["splits"]["test"]["targets"] == 3
    assert stats["splits"]["test"]["unseen_targets"] == 3  # 4, 6, 9 never in train
    assert stats["splits"]["valid"]["unseen_targets"] == 2  # 3, 8


def test_cutoffs_from_fraction_days_and_timestamp():
    lo, hi = day(0), day(100)
    assert temporal_cutoffs(SplitConfig(test_fraction=0.1, valid_fraction=0.1), lo, hi) == (day(80), day(90))
    cfg = SplitConfig(test_days=5, valid_days=2, test_fraction=None, valid_fraction=None)
    assert temporal_cutoffs(cfg, lo, hi) == (day(93), day(95))
    naive = SplitConfig(test_cutoff=datetime(2026, 3, 1), valid_days=10)  # naive means UTC
    expected = (datetime(2026, 2, 19, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC))
    assert temporal_cutoffs(naive, lo, hi) == expected
    with pytest.raises(ValueError, match="cutoffs"):
        temporal_cutoffs(SplitConfig(test_days=50, valid_days=60), lo, hi)


@pytest.mark.parametrize("seed", [0, 1])
def test_temporal_invariants_on_random_sequences(tmp_path, seed):
    rng = np.random.default_rng(seed)
    seqs = []
    for k in range(300):
        n = int(rng.integers(2, 12))
        start = rng.uniform(0, 95)
        ts = [day(start + float(x)) for x in np.sort(rng.uniform(0, rng.uniform(0.01, 10), n))]
        seqs.append((f"u{k % 70}", [int(i) for i in rng.integers(0, 50, n)], ts))
    stats, split_dir, _ = run_split(tmp_path, seqs, test_fraction=0.15, valid_fraction=0.1)
    valid_cut = datetime.fromisoformat(stats["valid_cutoff"])
    test_cut = datetime.fromisoformat(stats["test_cutoff"])
    original = {k: (items, ts) for k, (_, items, ts) in enumerate(seqs)}

    train = pl.read_parquet(split_dir / "train.parquet")
    assert train["ts"].explode().max() < valid_cut and (train["n_context"] == 0).all()
    expected_targets = {"valid": 0, "test": 0}
    for _, _items, ts in seqs:
        for p in range(1, len(ts)):
            if valid_cut <= ts[p] < test_cut:
                expected_targets["valid"] += 1
            elif ts[p] >= test_cut:
                expected_targets["test"] += 1
    for name, lo, hi in [("valid", valid_cut, test_cut), ("test", test_cut, None)]:
        frame = pl.read_parquet(split_dir / f"{name}.parquet")
        for row in frame.iter_rows(named=True):
            items, ts = original[row["session_id"]]
            n, c = len(row["items"]), row["n_context"]
            assert row["items"] == items[:n] and row["ts"] == ts[:n]  # a prefix with all earlier events
            assert c == sum(t < lo for t in ts)  # context = every event before the window
            assert all(lo <= t and (hi is None or t < hi) for t in row["ts"][max(c, 1):])
            assert hi is None or n == len(ts) or ts[n] >= hi
        assert stats["splits"][name]["targets"] == expected_targets[name]
    for row in train.iter_rows(named=True):
        items, ts = original[row["session_id"]]
        assert row["items"] == [i for i, t in zip(items, ts, strict=True) if t < valid_cut]


def test_stats_json_includes_ingest_report_and_prints(tmp_path):
    config = Config(paths=PathsConfig(data_root=tmp_path / "data"))
    report = {"rows_in": 12, "events_written": 9, "duplicates": 1, "quarantined": {"bad_ts": 2}}
    config.paths.data_root.mkdir(parents=True)
    (config.paths.data_root / "ingest_report.json").write_text(json.dumps(report))
    write_sessions(config.paths.sessions_dir, HAND)
    stats = split_sessions(config)
    saved = json.loads((config.paths.split_dir / "stats.json").read_text())
    assert saved["ingest"] == report and saved["splits"] == stats["splits"]
    assert saved["sequences"]["length"]["max"] == 6
    buf = io.StringIO()
    print_stats(saved, Console(file=buf, width=160))
    text = buf.getvalue()
    assert "Quarantine" in text and "bad_ts" in text and "unseen" in text and "test" in text


def test_empty_train_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="train empty"):
        run_split(tmp_path, [("a", [1, 2], [day(9), day(10)]), ("b", [1, 2], [day(0), day(10)])],
                  test_cutoff=day(9.5), valid_days=0.2)


def test_cli_sessions_then_split(tmp_path):
    from recsys.cli import app

    root = tmp_path / "data"
    rows = [(u, i, T0 + timedelta(days=u % 5, minutes=3 * i)) for u in range(20) for i in range(6)]
    write_events(root / "events", rows)
    conf = tmp_path / "conf"
    conf.mkdir()
    common = ["--conf", str(conf), "--set", f"paths.data_root={root}"]
    runner = CliRunner()
    result = runner.invoke(app, ["sessions", *common, "--set", "sessions.min_item_support=1"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["split", *common, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output and (tmp_path / "out" / "vocab.parquet").exists()
    result = runner.invoke(app, ["split", *common, "--sessions", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "part-*.parquet" in " ".join(result.output.split())


def test_cli_prepare_runs_all_three(tmp_path):
    pytest.importorskip("recsys.data.ingest")
    from recsys.cli import app

    lines = ["user_id,item_id,ts"] + [
        f"{u},{i},{int((T0 + timedelta(days=u % 5, minutes=3 * i)).timestamp())}"
        for u in range(20) for i in range(6)
    ]
    raw = tmp_path / "log.csv"
    raw.write_text("\n".join(lines) + "\n")
    conf = tmp_path / "conf"
    conf.mkdir()
    result = CliRunner().invoke(app, [
        "prepare", str(raw), "--conf", str(conf), "--set", f"paths.data_root={tmp_path / 'data'}",
        "--set", "sessions.min_item_support=1", "--set", "ingest.max_future_days=100000",
    ])
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "data" / "split" / "stats.json").read_text())
    assert stats["sequences"]["events"] == 120


def test_unseen_counted_without_any_context_and_empty_valid(tmp_path):
    seqs = [("a", [1, 2, 3], [day(0), day(1), day(2)]), ("b", [1, 7], [day(9.5), day(9.6)])]
    stats, split_dir, _ = run_split(tmp_path, seqs, test_cutoff=day(9), valid_days=1.0)
    assert read(split_dir, "valid") == [] and read(split_dir, "test") == [("b", [1, 7], 0)]
    assert stats["splits"]["test"]["unseen_targets"] == 1 and stats["splits"]["valid"]["targets"] == 0
    vocab = Vocab.load(split_dir / "vocab.parquet")
    assert load_sequences(split_dir / "valid.parquet", vocab).n_sequences == 0


@pytest.mark.parametrize("protocol", ["temporal", "leave_one_out"])
def test_split_of_many_sessions_files_matches_one_file(tmp_path, protocol):
    from test_sessions import random_rows

    from recsys.data.sessions import build_sessions

    config = Config(paths=PathsConfig(data_root=tmp_path / "data"),
                    sessions=SessionsConfig(mode="gap", gap_minutes=600, min_item_support=2),
                    split=SplitConfig(protocol=protocol))
    write_events(config.paths.events_dir, random_rows(2000, seed=5), user_dtype=pl.String)
    results = []
    for n_buckets in (1, 5):
        config.sessions.n_buckets = n_buckets
        build_sessions(config, out_dir=tmp_path / f"s{n_buckets}")
        out = tmp_path / f"split{n_buckets}"
        stats = split_sessions(config, tmp_path / f"s{n_buckets}", out)
        frames = {n: pl.read_parquet(out / f"{n}.parquet").sort("session_id")
                  for n in ("train", "valid", "test")}
        frames["vocab"] = pl.read_parquet(out / "vocab.parquet")
        results.append((stats, frames))
    (s1, f1), (s5, f5) = results
    assert s1["splits"] == s5["splits"] and s1["sequences"] == s5["sequences"]
    assert s1["splits"]["test"]["targets"] > 0 and s1["splits"]["valid"]["targets"] > 0
    for name in ("train", "valid", "test"):
        assert f1[name].equals(f5[name])
    assert f1["vocab"].sort("idx").equals(f5["vocab"].sort("idx"))
