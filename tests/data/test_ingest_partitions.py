"""Event partitions: deterministic output, replace/merge of the dates an input covers, crash safety,
and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import polars as pl
import pytest
from ingest_helpers import NOW, REPO, STAGING, events, make_config, run, tree_hashes, write
from typer.testing import CliRunner

from recsys.data import partitions

T0 = 1_767_268_800  # 2026-01-01T12:00:00Z
DAY = 86_400
HEADER = "user_id,item_id,ts\n"

pytestmark = pytest.mark.usefixtures("staging")  # each test stages rows in memory and on disk


def _log(tmp_path, name, rows):
    return write(tmp_path / name, HEADER + "".join(f"{u},{i},{t}\n" for u, i, t in rows))


def test_rerun_is_byte_identical_and_sorted(tmp_path):
    rows = [(3, 1, T0 + 5), (1, 2, T0 + 9), (1, 1, T0 + 9), (2, 7, T0 + DAY), (1, 1, T0)]
    src = _log(tmp_path, "day.csv", rows)
    root = tmp_path / "data"
    run([src], root)
    first = tree_hashes(root / "events")
    run([src], root)
    assert tree_hashes(root / "events") == first
    part = pl.read_parquet(root / "events" / "event_date=2026-01-01" / "part-0.parquet")
    assert part.select("user_id", "item_id").rows() == [(1, 1), (1, 1), (1, 2), (3, 1)]  # (user, ts, item)


def test_new_input_replaces_only_the_dates_it_covers(tmp_path):
    root = tmp_path / "data"
    run([_log(tmp_path, "d1d2.csv", [(1, 1, T0), (1, 2, T0 + DAY)])], root)
    before = tree_hashes(root / "events")
    report = run([_log(tmp_path, "d2d3.csv", [(2, 5, T0 + DAY), (2, 6, T0 + 2 * DAY)])], root)
    assert report.partitions == ["event_date=2026-01-02", "event_date=2026-01-03"]
    assert report.partitions_replaced == 1
    after = tree_hashes(root / "events")
    day1 = "event_date=2026-01-01/part-0.parquet"
    assert after[day1] == before[day1]
    assert set(after) == {day1, *(f"event_date=2026-01-0{d}/part-0.parquet" for d in (2, 3))}
    ev = events(root)
    assert ev.filter(pl.col("ts").dt.day() == 2)["item_id"].to_list() == [5]  # replaced, not merged


def test_merge_mode_unions_and_counts_stored_copies_as_duplicates(tmp_path):
    root = tmp_path / "data"
    run([_log(tmp_path, "a.csv", [(1, 1, T0), (1, 2, T0 + 60)])], root, partition_mode="merge")
    report = run([_log(tmp_path, "b.csv", [(1, 2, T0 + 60), (1, 3, T0 + 120)])], root, partition_mode="merge")
    assert (report.events_written, report.duplicates) == (1, 1)
    assert events(root)["item_id"].to_list() == [1, 2, 3]


def test_crash_before_rename_leaves_previous_state(tmp_path, monkeypatch):
    root = tmp_path / "data"
    run([_log(tmp_path, "old.csv", [(1, 1, T0), (1, 2, T0 + DAY)])], root)
    before = tree_hashes(root / "events")
    new = _log(tmp_path, "new.csv", [(9, 9, T0), (9, 9, T0 + DAY)])

    def crash(dest):
        if "events" in dest.parts:
            raise KeyboardInterrupt("simulated crash between write and rename")

    monkeypatch.setattr(partitions, "before_commit", crash)
    with pytest.raises(KeyboardInterrupt):
        run([new], root)
    assert tree_hashes(root / "events") == before
    monkeypatch.setattr(partitions, "before_commit", None)
    run([new], root)
    assert events(root)["user_id"].to_list() == [9, 9]


KILLER = """
import os, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from ingest_helpers import STAGING, run
from recsys.data import partitions
STAGING.update({staging!r})
def die(dest):
    if dest.name == "part-0.parquet" and "2026-01-02" in str(dest):
        os.kill(os.getpid(), 9)  # kill -9 after day 1 was replaced, with day 2 written but not renamed
partitions.before_commit = die
run([Path({src!r})], Path({root!r}))
"""


def test_kill_9_mid_run_keeps_each_partition_whole_and_next_run_cleans_up(tmp_path):
    root = tmp_path / "data"
    run([_log(tmp_path, "old.csv", [(1, 1, T0), (1, 2, T0 + DAY)])], root)
    before = tree_hashes(root / "events")
    new = _log(tmp_path, "new.csv", [(9, 8, T0), (9, 9, T0 + DAY)])
    code = KILLER.format(tests=str(REPO / "tests" / "data"), src=str(new), root=str(root),
                         staging=dict(STAGING))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    stale = root / partitions.WORK_DIR
    assert any(stale.rglob("*.parquet"))  # the killed run's written-but-not-renamed file
    after = tree_hashes(root / "events")
    assert after["event_date=2026-01-02/part-0.parquet"] == before["event_date=2026-01-02/part-0.parquet"]
    assert set(after) == set(before)  # nothing half-written is visible
    for f in (root / "events").glob("event_date=*/*.parquet"):
        pl.read_parquet(f)  # every visible partition is a complete file
    run([new], root)  # the next run removes the stale work dir and finishes the job
    assert not stale.exists()
    assert events(root).sort("ts")["item_id"].to_list() == [8, 9]


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
    assert "wrong_field_count" in result.output
    report = json.loads((root / "ingest_report.json").read_text())
    assert report["events_written"] == 2 and report["quarantined"] == {"wrong_field_count": 1}
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
    assert saved["duplicates"] == 1 and saved["files"][0]["rows"] == 2
    assert make_config(root).paths.events_dir == root / "events"
    assert NOW.year == 2026 and os.path.isdir(root / "events")
