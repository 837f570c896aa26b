"""The events table: one commit per run, merge by default (late data deletes nothing), explicit replace,
idempotent re-ingest, versions as lineage, a full disk or kill -9 changes nothing, and the CLI."""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import polars as pl
import pytest
from ingest_helpers import NOW, REPO, STAGING, events, make_config, run, tree_hashes, write
from typer.testing import CliRunner

from recsys.data import events_table
from recsys.data.errors import IngestError

T0 = 1_767_268_800  # 2026-01-01T12:00:00Z
DAY = 86_400
HEADER = "user_id,item_id,ts\n"

pytestmark = pytest.mark.usefixtures("staging")  # each test stages rows in memory and on disk


def _log(tmp_path, name, rows):
    return write(tmp_path / name, HEADER + "".join(f"{u},{i},{t}\n" for u, i, t in rows))


def _data_files(root):
    return sorted(p.relative_to(root / "events") for p in (root / "events").glob("*=*/*.parquet"))


def test_one_run_is_one_commit_and_reingest_changes_nothing(tmp_path):
    rows = [(3, 1, T0 + 5), (1, 2, T0 + 9), (1, 1, T0 + 9), (2, 7, T0 + DAY), (1, 1, T0)]
    src = _log(tmp_path, "day.csv", rows)
    root = tmp_path / "data"
    first = run([src], root)
    assert first.table_version == 0 and first.partitions == ["event_date=2026-01-01", "event_date=2026-01-02"]
    files = tree_hashes(root / "events")
    again = run([src], root)  # idempotent: every row is already stored
    assert (again.events_written, again.duplicates, again.table_version) == (0, 5, 0)
    assert tree_hashes(root / "events") == files
    part = pl.read_parquet(next((root / "events").glob("event_date=2026-01-01/*.parquet")))
    assert part.select("user_id", "item_id").rows() == [(1, 1), (1, 1), (1, 2), (3, 1)]  # (user, ts, item)


def test_late_event_in_the_next_days_file_adds_it_and_deletes_nothing(tmp_path):
    root = tmp_path / "data"
    yesterday = [(u, 100 + u, T0 + u) for u in range(100)]
    run([_log(tmp_path, "d1.csv", yesterday)], root)
    report = run([_log(tmp_path, "d2.csv", [(500, 1, T0 + DAY), (501, 2, T0 + 30)])], root)  # one late
    assert report.partition_mode == "merge" and report.replaced == {}
    assert (report.events_written, report.table_version) == (2, 1)
    ev = events(root)
    assert ev.filter(pl.col("ts").dt.day() == 1).height == 101  # 100 + the late one
    assert events(root, version=0).height == 100  # the previous version is still readable


def test_replace_is_explicit_and_names_what_it_replaced(tmp_path):
    root = tmp_path / "data"
    run([_log(tmp_path, "d1d2.csv", [(1, 1, T0), (1, 2, T0 + DAY), (1, 3, T0 + DAY + 1)])], root)
    report = run([_log(tmp_path, "fix.csv", [(2, 5, T0 + DAY)])], root, partition_mode="replace")
    assert report.replaced == {"2026-01-02": 2}
    assert report.partitions == ["event_date=2026-01-02"]
    ev = events(root)
    assert ev.filter(pl.col("ts").dt.day() == 2)["item_id"].to_list() == [5]  # replaced, not merged
    assert ev.filter(pl.col("ts").dt.day() == 1)["item_id"].to_list() == [1]  # untouched
    assert events(root, version=0).height == 3


def test_disk_full_at_commit_changes_nothing_and_says_so(tmp_path, monkeypatch):
    root = tmp_path / "data"
    run([_log(tmp_path, "old.csv", [(1, 1, T0), (1, 2, T0 + DAY)])], root)
    before = tree_hashes(root / "events")
    new = _log(tmp_path, "new.csv", [(9, 9, T0 + 5), (9, 9, T0 + 2 * DAY), ("", 1, T0)])

    def full(_events_dir):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(events_table, "before_commit", full)
    with pytest.raises(IngestError) as err:
        run([new], root, max_bad_fraction=0.5)
    message = str(err.value)
    assert "\n" not in message and str(root / "events") in message
    assert "no space left on device" in message and "nothing was changed" in message
    assert "version 0" in message
    assert tree_hashes(root / "events") == before  # the written files were removed again
    assert not (root / "quarantine").exists()  # the quarantine was not published either
    assert events(root).height == 2
    monkeypatch.setattr(events_table, "before_commit", None)
    assert run([new], root, max_bad_fraction=0.5).table_version == 1


def test_disk_full_while_staging_is_the_same_one_line_error(tmp_path, monkeypatch):
    from recsys.data import staging

    root = tmp_path / "data"
    run([_log(tmp_path, "old.csv", [(1, 1, T0)])], root)
    before = tree_hashes(root)

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(staging.Stage, "put", full)
    with pytest.raises(IngestError) as err:
        run([_log(tmp_path, "new.csv", [(2, 2, T0)])], root)
    assert "no space left on device while ingesting; nothing was changed" in str(err.value)
    assert "\n" not in str(err.value)
    assert {k: v for k, v in tree_hashes(root).items() if not k.startswith(".ingest")} == {
        k: v for k, v in before.items() if not k.startswith(".ingest")}


KILLER = """
import os, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from ingest_helpers import STAGING, run
from recsys.data import events_table
STAGING.update({staging!r})
events_table.before_commit = lambda _: os.kill(os.getpid(), 9)  # files written, not committed
run([Path({src!r})], Path({root!r}))
"""


def test_kill_9_before_commit_leaves_the_table_and_next_run_removes_the_orphans(tmp_path):
    root = tmp_path / "data"
    run([_log(tmp_path, "old.csv", [(1, 1, T0), (1, 2, T0 + DAY)])], root)
    before = events(root)
    files = _data_files(root)
    new = _log(tmp_path, "new.csv", [(9, 8, T0), (9, 9, T0 + 3 * DAY)])
    code = KILLER.format(tests=str(REPO / "tests" / "data"), src=str(new), root=str(root),
                         staging=dict(STAGING))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    assert len(_data_files(root)) > len(files)  # the killed run's uncommitted files
    assert events(root).equals(before)  # invisible to readers
    assert events_table.table_version(root / "events") == 0
    report = run([new], root)
    assert report.table_version == 1 and report.events_written == 2
    assert len(_data_files(root)) == len(files) + 2  # orphans gone, the new run's two files in
    assert events(root).height == 4


def test_granularity_is_month_for_a_sparse_backfill_over_years(tmp_path):
    root = tmp_path / "data"
    rows = [(u, 1, 946_684_800 + u * 40 * DAY) for u in range(100)]  # 2000-01-01 + 11 years
    report = run([_log(tmp_path, "old.csv", rows)], root, min_ts="1999-01-01T00:00:00")
    assert report.partition_by == "month"
    assert all(p.startswith("event_month=") for p in report.partitions) and len(report.partitions) == 100
    again = run([_log(tmp_path, "late.csv", [(7, 2, 946_684_800 + 7 * 40 * DAY + 60)])], root,
                min_ts="1999-01-01T00:00:00")
    assert (again.partition_by, again.events_written) == ("month", 1)
    assert events(root).height == 101
    with pytest.raises(IngestError, match="partitioned by event_month"):
        run([_log(tmp_path, "x.csv", [(1, 1, T0)])], root, partition_by="day")


def test_legacy_hive_folder_is_converted_in_place(tmp_path):
    root = tmp_path / "data"
    old = root / "events" / "event_date=2026-01-01"
    old.mkdir(parents=True)
    legacy = pl.DataFrame({"user_id": [1], "item_id": [1], "ts": [T0 * 1_000_000], "watch_seconds": [None],
                           "event_type": [None]},
                          schema_overrides={"watch_seconds": pl.Float64, "event_type": pl.String})
    legacy.with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC"))).write_parquet(old / "part-0.parquet")
    report = run([_log(tmp_path, "new.csv", [(1, 1, T0), (2, 2, T0)])], root)
    assert (report.events_written, report.duplicates, report.table_version) == (1, 1, 1)
    assert events(root)["user_id"].to_list() == [1, 2]


def test_cli_ingest_prints_counts_and_fails_cleanly(tmp_path, monkeypatch):
    from recsys.cli import app

    root = tmp_path / "data"
    monkeypatch.setenv("RECSYS_DATA_ROOT", str(root))
    good = write(tmp_path / "u.data", f"1\t2\t5\t{T0}\n1\t3\t4\t{T0 + 1}\nbad line\n")
    runner = CliRunner()
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "ingest.yaml").write_text((REPO / "conf" / "ingest.yaml").read_text())
    result = runner.invoke(app, ["ingest", str(good), "--preset", "movielens-100k", "--conf", str(conf),
                                 "--set", "ingest.max_bad_fraction=0.5"])
    assert result.exit_code == 0, result.output
    assert "events written" in result.output and "truncated_last_line" not in result.output
    assert "wrong_field_count" in result.output and "version 0" in result.output
    report = json.loads((root / "ingest_report.json").read_text())
    assert report["events_written"] == 2 and report["quarantined"] == {"wrong_field_count": 1}
    fix = write(tmp_path / "fix.data", f"7\t2\t5\t{T0 + 5}\n")
    result = runner.invoke(app, ["ingest", str(fix), "--preset", "movielens-100k", "--conf", str(conf),
                                 "--replace"])
    assert result.exit_code == 0, result.output
    assert "replaced event_date=2026-01-01 (2 events)" in " ".join(result.output.split())
    result = runner.invoke(app, ["ingest", str(good), "--preset", "movielens-100k", "--conf", str(conf),
                                 "--set", "ingest.max_bad_fraction=0.1"])
    assert result.exit_code == 1
    assert "max_bad_fraction" in " ".join(result.output.split())
    missing = runner.invoke(app, ["ingest", str(tmp_path / "nope.csv"), "--conf", str(conf)])
    assert missing.exit_code == 1 and "no such file" in missing.output


def test_report_json_matches_report(tmp_path):
    root = tmp_path / "data"
    report = run([_log(tmp_path, "a.csv", [(1, 1, T0), (1, 1, T0)])], root)
    saved = json.loads((root / "ingest_report.json").read_text())
    assert saved == json.loads(json.dumps(report.to_dict()))
    assert saved["duplicates"] == 1 and saved["files"][0]["rows"] == 2 and saved["table_version"] == 0
    assert make_config(root).paths.events_dir == root / "events"
    assert NOW.year == 2026
