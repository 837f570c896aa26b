"""Validation: file-level errors, quarantine reasons with row numbers and raw text, bad-fraction limit,
de-duplication, and the conservation property (every row: event, duplicate or quarantine)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ingest_helpers import assert_conserved, events, quarantine, run, write

from recsys.data.ingest import IngestError

T0 = 1_767_268_800  # 2026-01-01T12:00:00Z
HEADER = "user_id,item_id,ts,watch_seconds\n"

pytestmark = pytest.mark.usefixtures("staging")  # each test stages rows in memory and on disk


def test_every_reason_is_quarantined_with_row_and_raw(tmp_path):
    lines = [
        f"1,10,{T0},5",            # 1 good
        f"1,10,{T0},5,extra",      # 2 wrong_field_count (too many)
        "1,10",                    # 3 wrong_field_count (too few, not last)
        f",10,{T0},5",             # 4 null_user_id
        f"2,,{T0},5",              # 5 null_item_id
        f"2,abc,{T0},5",           # 6 bad_item_id (ids are integers)
        "2,11,,5",                 # 7 null_ts
        "2,11,yesterday,5",        # 8 bad_ts
        "2,11,100,5",              # 9 ts_out_of_range (1970)
        f"2,11,{T0 + 400 * 86_400},5",  # 10 ts_out_of_range (future)
        f"2,11,{T0},lots",         # 11 bad_watch_seconds
        "",                        # blank line: not a row
        f"3,12,{T0},",             # 13 good
        f"3,12,{T0}",              # 14 wrong_field_count
        "3,1",                     # 15 truncated_last_line (no newline)
    ]
    src = write(tmp_path / "bad.csv", HEADER + "\n".join(lines))
    root = tmp_path / "data"
    report = run([src], root, max_bad_fraction=1.0, item_id_type="int")
    assert_conserved(report)
    assert report.rows_in == 14 and report.files[0].blank_lines == 1
    assert report.events_written == 2
    assert report.quarantined == {
        "bad_item_id": 1, "bad_ts": 1, "bad_watch_seconds": 1, "null_item_id": 1, "null_ts": 1,
        "null_user_id": 1, "truncated_last_line": 1, "ts_out_of_range": 2, "wrong_field_count": 3,
    }
    q = quarantine(root)
    assert q.columns == ["source", "row", "reason", "raw"]
    assert q["row"].to_list() == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 14, 15]
    assert q["source"].unique().to_list() == [str(src)]
    by_row = {r: (reason, raw) for _, r, reason, raw in q.iter_rows()}
    assert by_row[6] == ("bad_item_id", f"2,abc,{T0},5")
    assert by_row[15] == ("truncated_last_line", "3,1")
    assert by_row[2] == ("wrong_field_count", f"1,10,{T0},5,extra")


def test_too_many_bad_rows_fails_after_writing_quarantine(tmp_path):
    src = write(tmp_path / "mostly_bad.csv", HEADER + f"1,2,{T0},1\n" + "x\n" * 3)
    root = tmp_path / "data"
    with pytest.raises(IngestError, match=r"3 of 4 rows .*max_bad_fraction") as err:
        run([src], root, max_bad_fraction=0.5)
    assert err.value.report.quarantined == {"wrong_field_count": 3}  # file ends with a newline: not truncated
    assert quarantine(root).height == 3  # nothing lost
    assert not list((root / "events").glob("event_date=*"))  # events untouched


@pytest.mark.parametrize(
    ("name", "text", "pattern"),
    [
        ("nouser.csv", f"uid,item_id,ts\n1,2,{T0}\n", r"nouser\.csv.*'user_id'"),
        ("empty.csv", "", r"empty\.csv: empty input"),
        ("header_only.csv", HEADER, r"header_only\.csv: empty input: no data rows"),
        ("blank.csv", "\n\n", r"blank\.csv: empty input"),
        ("what.xyz", "a", r"what\.xyz: cannot tell the format"),
    ],
)
def test_file_level_errors_name_the_file(tmp_path, name, text, pattern):
    src = write(tmp_path / name, text)
    with pytest.raises(IngestError, match=pattern):
        run([src], tmp_path / "data")
    assert not (tmp_path / "data" / "events").exists()


def test_missing_and_unreadable_inputs(tmp_path):
    with pytest.raises(IngestError, match=r"nope\.csv: no such file"):
        run([tmp_path / "nope.csv"], tmp_path / "data")
    broken = tmp_path / "broken.csv.gz"
    broken.write_bytes(b"\x1f\x8b\x08 definitely not gzip")
    with pytest.raises(IngestError, match=r"broken\.csv\.gz"):
        run([broken], tmp_path / "data")
    notparquet = write(tmp_path / "x.parquet", "hello")
    with pytest.raises(IngestError, match=r"x\.parquet"):
        run([notparquet], tmp_path / "data")
    with pytest.raises(IngestError, match="no input"):
        run([], tmp_path / "data")


def test_missing_column_in_parquet_and_ndjson(tmp_path):
    import polars as pl

    pq = tmp_path / "p.parquet"
    pl.DataFrame({"user_id": [1], "ts": [T0]}).write_parquet(pq)
    with pytest.raises(IngestError, match=r"p\.parquet: required column 'item_id'"):
        run([pq], tmp_path / "data")
    nd = write(tmp_path / "n.ndjson", f'{{"user_id": 1, "item": 2, "ts": {T0}}}\n')
    with pytest.raises(IngestError, match=r"n\.ndjson: required column 'item_id'"):
        run([nd], tmp_path / "data")


def test_duplicates_within_and_across_files_keep_first(tmp_path):
    a = write(tmp_path / "a.csv", HEADER + f"1,2,{T0},10\n1,2,{T0},99\n1,3,{T0},1\n")
    b = write(tmp_path / "b.csv", HEADER + f"1,2,{T0},77\n2,2,{T0},1\n")
    root = tmp_path / "data"
    report = run([a, b], root)
    assert_conserved(report)
    assert (report.duplicates, report.events_written) == (2, 3)
    assert [f.duplicates for f in report.files] == [1, 1]
    ev = events(root)
    assert ev.filter(user_id=1, item_id=2)["watch_seconds"].to_list() == [10.0]


def test_first_copy_in_input_order_wins_among_many_files(tmp_path):
    # staged files are named f0..f11: "f10" sorts before "f2" as text, input order must still win
    srcs = [write(tmp_path / f"p{j:02d}.csv", HEADER + f"{j + 10},1,{T0},1\n") for j in range(12)]
    srcs[2] = write(srcs[2], HEADER + f"1,2,{T0},2\n\n1,3,{T0},2\n")
    srcs[10] = write(srcs[10], HEADER + f"1,2,{T0},10\n1,3,{T0},10")
    root = tmp_path / "data"
    report = run(srcs, root)
    assert_conserved(report)
    assert [f.duplicates for f in report.files] == [0] * 10 + [2, 0]
    assert (report.files[2].rows, report.files[2].blank_lines) == (2, 1)
    assert report.files[10].rows == 2
    assert events(root).filter(user_id=1)["watch_seconds"].to_list() == [2.0, 2.0]


# --- conservation property -------------------------------------------------------------------------

BAD_LINES = ["", "x", "1,2", f"1,2,{T0},3,4", f",2,{T0},", f"1,,{T0},", "1,2,,", "1,2,nope,",
             "1,q,5,", "1,2,5,", f"1,2,{T0},zz"]
BAD_LINES = [b for b in BAD_LINES if b]  # blank lines are not rows; they are tested above


@st.composite
def log_rows(draw):
    """Lines of a CSV body plus the expected outcome of each: 'good', 'dup' or 'bad'."""
    n = draw(st.integers(1, 40))
    lines: list[str] = []
    kinds: list[str] = []
    keys: list[tuple[int, int, int]] = []
    for _ in range(n):
        kind = draw(st.sampled_from(["good", "good", "dup", "bad"]))
        if kind == "dup" and keys:
            u, i, t = draw(st.sampled_from(keys))
            lines.append(f"{u},{i},{t},{draw(st.integers(0, 9))}")
        elif kind == "bad":
            lines.append(draw(st.sampled_from(BAD_LINES)))
        else:
            kind = "good"
            key = (draw(st.integers(1, 4)), draw(st.integers(1, 4)), T0 + draw(st.integers(0, 3)) * 43_200)
            if key in keys:
                kind = "dup"
            keys.append(key)
            lines.append(f"{key[0]},{key[1]},{key[2]},")
        kinds.append(kind)
    trailing_newline = draw(st.booleans())
    cut = draw(st.integers(1, n - 1)) if n >= 2 and draw(st.booleans()) else n  # one or two files
    return lines, kinds, trailing_newline, cut


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(log_rows())
def test_every_row_is_an_event_a_duplicate_or_quarantined(case):
    lines, kinds, trailing_newline, cut = case
    end = "\n" if trailing_newline else ""
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        parts = [(lines[:cut], kinds[:cut])] + ([(lines[cut:], kinds[cut:])] if cut < len(lines) else [])
        srcs = [write(tmp_path / f"log{j}.csv", HEADER + "\n".join(ls) + end)
                for j, (ls, _) in enumerate(parts)]
        root = tmp_path / "data"
        report = run(srcs, root, max_bad_fraction=1.0)
        assert_conserved(report)
        assert report.rows_in == len(lines)
        assert report.events_written == kinds.count("good") == events(root).height
        assert report.duplicates == kinds.count("dup")  # across files too: the first copy is kept
        q = quarantine(root)
        for src, (ls, ks) in zip(srcs, parts, strict=True):
            bad_rows = [i + 1 for i, k in enumerate(ks) if k == "bad"]
            mine = q.filter(source=str(src)) if q.height else q
            assert (mine["row"].to_list() if q.height else []) == bad_rows
            if bad_rows:
                assert mine["raw"].to_list() == [ls[r - 1] for r in bad_rows]
