"""Hostile inputs (issue 12, rows 1-8 and 12-14): each case is built here, with the events and quarantine
reasons it must give; plus a property: random mixtures of good, broken and blank rows with random quoting
conserve every row and store only ids that were in the input, byte for byte."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ingest_helpers import assert_conserved, events, quarantine, run, write

from recsys.data.errors import IngestError

T0 = 1_767_268_800  # 2026-01-01T12:00:00Z
HEADER = "user_id,item_id,ts\n"


def _ts(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def test_1_quoted_line_break_is_one_event(tmp_path):
    src = write(tmp_path / "log.csv", HEADER + f'"first\nline""",7,{T0}\nu2,8,{T0 + 1}\n'
                                      f'"a, ""b""\n\nc",9,{T0 + 2}\n')
    report = run([src], tmp_path / "data")
    assert (report.rows_in, report.events_written, report.quarantined) == (3, 3, {})
    assert sorted(events(tmp_path / "data")["user_id"]) == ['a, "b"\n\nc', 'first\nline"', "u2"]


def test_1_a_stray_quote_does_not_swallow_the_rest_of_the_file(tmp_path):
    src = write(tmp_path / "log.csv", HEADER + f'5"x,1,{T0}\n"open,2,{T0}\n' +
                "".join(f"u{i},3,{T0 + i}\n" for i in range(5)))
    report = run([src], tmp_path / "data", max_bad_fraction=1.0)
    assert report.quarantined == {"wrong_field_count": 1} and report.events_written == 6
    assert '5"x' in events(tmp_path / "data")["user_id"].to_list()


def test_2_ids_are_opaque(tmp_path):
    src = write(tmp_path / "log.csv", HEADER + f"007,1,{T0}\n+7,1,{T0}\n7,1,{T0}\n")
    report = run([src], tmp_path / "data")
    assert (report.events_written, report.duplicates, report.user_id_type) == (3, 0, "str")
    assert sorted(events(tmp_path / "data")["user_id"]) == ["+7", "007", "7"]
    # integer ids only when asked for, and then a non-canonical spelling is quarantined, not normalised
    report = run([src], tmp_path / "int", user_id_type="int", max_bad_fraction=1.0)
    assert report.quarantined == {"bad_user_id": 2} and events(tmp_path / "int")["user_id"].to_list() == [7]


def test_3_ndjson_objects_arrays_and_fractions_are_not_ids(tmp_path):
    lines = [
        {"user_id": {"id": "u1", "admin": True}, "item_id": 1, "ts": T0},
        {"user_id": [1, 2], "item_id": 1, "ts": T0},
        {"user_id": "u3", "item_id": 7.5, "ts": T0},
        {"user_id": 7.0, "item_id": 1, "ts": T0},
        {"user_id": True, "item_id": 1, "ts": T0},
        {"user_id": "7.0", "item_id": "{x}", "ts": T0},  # strings: kept as written
        {"user_id": 12, "item_id": "a", "ts": T0},
    ]
    src = write(tmp_path / "log.ndjson", "\n".join(json.dumps(x) for x in lines) + "\n")
    report = run([src], tmp_path / "data", max_bad_fraction=1.0)
    assert report.quarantined == {"bad_item_id": 1, "bad_user_id": 4}
    stored = sorted(events(tmp_path / "data").select("user_id", "item_id").rows())
    assert stored == [("12", "a"), ("7.0", "{x}")]
    q = quarantine(tmp_path / "data")
    assert q.filter(pl.col("row") == 1)["raw"].item() == json.dumps(lines[0])


@pytest.mark.parametrize(("column", "values", "dtype"), [
    ("user_id", [[1], [2]], "List"),
    ("item_id", [{"a": 1}, {"a": 2}], "Struct"),
    ("ts", [b"x", b"y"], "Binary"),
    ("user_id", [1.0, float("nan")], "Float64"),
])
def test_4_parquet_column_of_a_wrong_type_names_file_column_and_type(tmp_path, column, values, dtype):
    frame = {"user_id": [1, 2], "item_id": [1, 2], "ts": [T0, T0 + 1], column: values}
    src = tmp_path / "bad.parquet"
    pl.DataFrame(frame).write_parquet(src)
    with pytest.raises(IngestError) as err:
        run([src], tmp_path / "data")
    msg = str(err.value)
    assert str(src) in msg and repr(column) in msg and dtype in msg and "\n" not in msg


def test_5_timestamps_are_parsed_per_value(tmp_path):
    start = datetime(2026, 1, 1, tzinfo=UTC)
    z = [f"u{i},1,{(start + timedelta(seconds=i)).strftime('%Y-%m-%dT%H:%M:%SZ')}\n" for i in range(10_000)]
    zoned = [f"v{i},2,{(start + timedelta(hours=1, seconds=i)).strftime('%Y-%m-%dT%H:%M:%S')}+01:00\n"
             for i in range(300)]
    numeric = [f"w{i},3,{T0 + i}\n" for i in range(10_000)]
    iso_after = [f"x{i},4,2026-01-02 10:00:{i % 60:02d}\n" for i in range(300)]
    src = write(tmp_path / "zones.csv", HEADER + "".join(z + zoned))
    src2 = write(tmp_path / "mixed.csv", HEADER + "".join(numeric + iso_after))
    report = run([src, src2], tmp_path / "data")
    assert report.quarantined == {} and report.events_written == 20_600
    ev = events(tmp_path / "data")
    assert ev.filter(pl.col("user_id") == "v5")["ts"].item() == start + timedelta(seconds=5)
    assert ev.filter(pl.col("user_id") == "x5")["ts"].item() == datetime(2026, 1, 2, 10, 0, 5, tzinfo=UTC)


def test_6_duplicate_header_names_are_an_error_naming_them(tmp_path):
    src = write(tmp_path / "dup.csv", f"user_id,item_id,ts,ts\nu,1,{T0},{T0 + 5}\n")
    with pytest.raises(IngestError, match=r"dup\.csv: the header names \['ts'\] more than once"):
        run([src], tmp_path / "data")


def test_7_valid_replacement_character_is_not_bad_encoding(tmp_path):
    src = tmp_path / "enc.csv"
    src.write_bytes(HEADER.encode() + f"caf\ufffd,1,{T0}\n".encode() + b"bad\xff,2," + str(T0).encode() +
                    b"\n" + f"ok,3,{T0}\n".encode())
    report = run([src], tmp_path / "data", max_bad_fraction=1.0)
    assert report.quarantined == {"bad_encoding": 1} and report.events_written == 2
    assert sorted(events(tmp_path / "data")["user_id"]) == ["caf\ufffd", "ok"]
    assert quarantine(tmp_path / "data")["row"].to_list() == [2]


def test_8_a_huge_header_is_not_echoed(tmp_path):
    src = write(tmp_path / "wide.csv", ",".join(f"col{i}" for i in range(1_000_000)) + "\n1,2,3\n")
    with pytest.raises(IngestError) as err:
        run([src], tmp_path / "data")
    assert "wide.csv" in str(err.value) and "'user_id'" in str(err.value) and len(str(err.value)) < 600


def test_12_same_file_twice_keeps_report_and_quarantine_equal(tmp_path):
    src = write(tmp_path / "log.csv", HEADER + f"u,1,{T0}\n,2,{T0}\nv,3,nope\n")
    root = tmp_path / "data"
    report = run([src, src], root, max_bad_fraction=1.0)
    assert report.n_quarantined == 4 and quarantine(root).height == 4
    assert (report.events_written, report.duplicates) == (1, 1)
    assert len(list((root / "quarantine").glob("*.parquet"))) == 2
    run([src], root, max_bad_fraction=1.0)  # one occurrence now: the second file goes
    assert quarantine(root).height == 2


def test_13_csv_export_escapes_formulas_and_parquet_keeps_raw_ids():
    from recsys.serving.export import csv_safe

    recs = pl.DataFrame({"user_id": ["=cmd|' /C calc'!A0", "+1", "-2", "@x", "ok"], "rank": [1] * 5,
                         "score": [-0.5] * 5})
    safe = csv_safe(recs)
    assert safe["user_id"].to_list() == ["'=cmd|' /C calc'!A0", "'+1", "'-2", "'@x", "ok"]
    assert safe["score"].to_list() == [-0.5] * 5 and recs["user_id"][0].startswith("=")


DIGINETICA_ROWS = "1;NA;81766;43200000;2026-01-01\n1;NA;31331;43207000;2026-01-01\n"


@pytest.mark.parametrize(("name", "text", "preset"), [
    ("views.csv", "sessionId;userId;itemId;timeframe;eventdate\n" + DIGINETICA_ROWS, "diginetica"),
    ("views.csv", "session_id;user_id;item_id;timeframe;eventdate\n" + DIGINETICA_ROWS, "diginetica"),
    ("clicks.dat", "1,2026-01-01T12:00:00.000Z,214536502,0\n1,2026-01-01T12:00:07.000Z,214536500,S\n",
     "yoochoose"),
    ("clicks.dat", "session_id,timestamp,item_id,category\n1,2026-01-01T12:00:00.000Z,214536502,0\n"
                   "1,2026-01-01T12:00:07.000Z,214536500,S\n", "yoochoose"),
    ("ratings.csv", f"user_id,movie_id,rating,timestamp\n1,1,4.0,{T0}\n1,3,4.0,{T0 + 7}\n", "movielens-csv"),
])
def test_14_presets_accept_the_real_variants(tmp_path, name, text, preset):
    report = run([write(tmp_path / name, text)], tmp_path / "data", preset=preset)
    assert report.events_written == 2 and report.quarantined == {}
    assert events(tmp_path / "data")["ts"].sort().to_list() == [_ts(T0), _ts(T0 + 7)]


def test_14_preset_mismatch_shows_expected_and_found_header(tmp_path):
    src = write(tmp_path / "views.csv", "session;item;when\n1;2;3\n")
    with pytest.raises(IngestError) as err:
        run([src], tmp_path / "data", preset="diginetica")
    msg = str(err.value)
    assert "expected 'sessionId;userId;itemId;timeframe;eventdate'" in msg
    assert "found 'session;item;when'" in msg


# --- property: conservation and nothing invented -----------------------------------------------------

_ID_CHARS = st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zl", "Zp"),
                          include_characters='",=+\n \ufffd')
_IDS = st.text(_ID_CHARS, min_size=1, max_size=8).filter(lambda s: s.strip() == s and s.strip())


def _field(value: str, quote: bool) -> str:
    if quote or any(c in value for c in ',"\n') or value[:1] == '"':
        return '"' + value.replace('"', '""') + '"'
    return value


_GOOD = st.tuples(st.just("good"), _IDS, _IDS, st.integers(0, 50), st.booleans(), st.booleans())
_BROKEN = st.sampled_from([("broken", "x,y"), ("broken", "a,b,c,d"), ("broken", f",1,{T0}"),
                           ("broken", "u,1,not-a-time"), ("blank", "")])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(_GOOD, _GOOD, _BROKEN), min_size=1, max_size=25))
def test_property_rows_are_conserved_and_ids_come_from_the_input(tmp_path_factory, rows):
    tmp = tmp_path_factory.mktemp("prop")
    lines, good = [], []
    for row in rows:
        if row[0] == "good":
            _, user, item, dt, qu, qi = row
            lines.append(f"{_field(user, qu)},{_field(item, qi)},{T0 + dt}")
            good.append((user, item, T0 + dt))
        else:
            lines.append(row[1])
    if not good:
        lines.append(f"anchor,1,{T0}")
        good.append(("anchor", "1", T0))
    src = write(tmp / "p.csv", HEADER + "\n".join(lines) + "\n")
    report = run([src], tmp / "data", max_bad_fraction=1.0)
    assert_conserved(report)
    blanks = sum(1 for r in rows if r[0] == "blank")
    assert report.rows_in + report.files[0].blank_lines == len(lines)
    assert report.files[0].blank_lines == blanks
    stored = {(str(u), str(i), int(t.timestamp())) for u, i, t in
              events(tmp / "data").select("user_id", "item_id", "ts").rows()}
    assert stored == set(good)  # every good row stored once, nothing invented, ids byte for byte
    assert report.events_written == len(set(good)) and report.duplicates == len(good) - len(set(good))
