"""Readers: CSV/TSV/Parquet/NDJSON, compression, presets, timestamp encodings, id types."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl
import pytest
from ingest_helpers import assert_conserved, events, run, write

from recsys.config import IngestConfig
from recsys.data.readers import scan_input
from recsys.schemas import TS_DTYPE

T0 = 1_767_268_800  # 2026-01-01T12:00:00Z

pytestmark = pytest.mark.usefixtures("staging")  # each test stages rows in memory and on disk


def _ts(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def test_csv_with_column_mapping(tmp_path):
    src = write(tmp_path / "in" / "log.csv",
                "viewer,title,when,secs,kind\n"
                f"u1,10,{T0},30.5,play\n"
                f"u1,11,{T0 + 60},,\n"
                f"u2,10,{T0 + 86_400},12,play\n")
    root = tmp_path / "data"
    report = run([src], root, columns={"user_id": "viewer", "item_id": "title", "ts": "when",
                                       "watch_seconds": "secs", "event_type": "kind"})
    assert_conserved(report)
    assert report.rows_in == 3 and report.events_written == 3
    assert report.partitions == ["event_date=2026-01-01", "event_date=2026-01-02"]
    ev = events(root)
    assert ev.schema["ts"] == TS_DTYPE and ev.schema["user_id"] == pl.String
    assert ev.schema["item_id"] == pl.Int64
    assert ev.columns == ["user_id", "item_id", "ts", "watch_seconds", "event_type"]
    assert ev.rows() == [("u1", 10, _ts(T0), 30.5, "play"), ("u1", 11, _ts(T0 + 60), None, None),
                         ("u2", 10, _ts(T0 + 86_400), 12.0, "play")]
    assert (root / "ingest_report.json").is_file()


def test_tsv_headerless_positional_columns(tmp_path):
    src = write(tmp_path / "log.tsv", f"1\t5\t{T0}\n2\t6\t{T0 + 1}\n")
    root = tmp_path / "data"
    report = run([src], root, has_header=False,
                 columns={"user_id": "column_1", "item_id": "column_2", "ts": "column_3"})
    assert report.events_written == 2
    assert events(root)["item_id"].to_list() == [5, 6]


def test_parquet_file_and_hive_directory(tmp_path):
    frame = pl.DataFrame({
        "user_id": [1, 1, 2],
        "item_id": ["a", "b", "a"],
        "ts": [datetime(2026, 1, 1, 10), datetime(2026, 1, 1, 11), datetime(2026, 1, 2, 9)],
        "watch_seconds": [1.0, 2.0, None],
    })
    single = tmp_path / "one.parquet"
    frame.write_parquet(single)
    hive = tmp_path / "hive"
    days = frame.with_columns(pl.col("ts").dt.date().alias("d")).partition_by("d", as_dict=True)
    for day, part in days.items():
        (hive / f"d={day[0]}").mkdir(parents=True)
        part.drop("d").write_parquet(hive / f"d={day[0]}" / "x.parquet")
    for src in (single, hive):
        root = tmp_path / f"data-{src.name}"
        report = run([src], root)
        assert report.events_written == 3 and report.files[0].kind == "parquet"
        ev = events(root).sort("user_id", "ts")
        assert ev["item_id"].to_list() == ["a", "b", "a"]
        assert ev["ts"].to_list()[0] == datetime(2026, 1, 1, 10, tzinfo=UTC)


def test_parquet_bad_rows_keep_raw_json(tmp_path):
    src = tmp_path / "p.parquet"
    pl.DataFrame({"user_id": [1, None], "item_id": [1, 2], "ts": [T0, T0]}).write_parquet(src)
    root = tmp_path / "data"
    report = run([src], root, max_bad_fraction=1.0)
    assert report.quarantined == {"null_user_id": 1}
    q = pl.read_parquet(next((root / "quarantine").glob("*.parquet")))
    assert q["row"].to_list() == [2] and '"item_id":2' in q["raw"][0]


def test_ndjson_with_malformed_and_truncated_lines(tmp_path):
    src = write(tmp_path / "log.jsonl",
                f'{{"user_id": 1, "item_id": 7, "ts": {T0}}}\n'
                "this is not json\n"
                f'{{"user_id": 2, "item_id": 8, "ts": "2026-01-01T12:00:00Z", "event_type": "play"}}\n'
                '{"user_id": 3, "item_id": 9, "ts": 17')
    root = tmp_path / "data"
    report = run([src], root, max_bad_fraction=1.0)
    assert_conserved(report)
    assert report.events_written == 2
    assert report.quarantined == {"malformed_json": 1, "truncated_last_line": 1}
    assert events(root).sort("user_id")["event_type"].to_list() == [None, "play"]


@pytest.mark.parametrize("suffix", [".csv.gz", ".csv.zst", ".jsonl.gz", ".tsv.zst"])
def test_compressed_inputs(tmp_path, suffix):
    if ".csv" in suffix:
        text = f"user_id,item_id,ts\n1,2,{T0}\n1,3,{T0 + 5}\n"
    elif ".tsv" in suffix:
        text = f"user_id\titem_id\tts\n1\t2\t{T0}\n1\t3\t{T0 + 5}\n"
    else:
        text = f'{{"user_id":1,"item_id":2,"ts":{T0}}}\n{{"user_id":1,"item_id":3,"ts":{T0 + 5}}}\n'
    src = write(tmp_path / f"log{suffix}", text)
    root = tmp_path / "data"
    assert run([src], root).events_written == 2
    assert events(root)["item_id"].to_list() == [2, 3]


def test_row_estimates_choose_where_rows_are_staged(tmp_path):
    body = "".join(f"{u},{u % 7},{T0 + u}\n" for u in range(500))
    csv = write(tmp_path / "a.csv", "user_id,item_id,ts\n" + body)
    gz = write(tmp_path / "a.csv.gz", "user_id,item_id,ts\n" + body)
    pq = tmp_path / "a.parquet"
    pl.DataFrame({"user_id": [1, 2, 3], "item_id": [4, 5, 6], "ts": [T0] * 3}).write_parquet(pq)
    cfg = IngestConfig()
    assert 450 <= scan_input(csv, cfg, tmp_path).rows_estimate <= 550  # type: ignore[operator]
    assert scan_input(gz, cfg, tmp_path).rows_estimate is None  # unknown: staged on disk
    assert scan_input(pq, cfg, tmp_path).rows_estimate == 3


PRESET_FILES = {
    "movielens-100k": ("u.data", f"196\t242\t3\t{T0}\n186\t302\t3\t{T0 + 7}\n"),
    "movielens-dat": ("ratings.dat", f"1::1193::5::{T0}\n1::661::3::{T0 + 7}\n"),
    "movielens-csv": ("ratings.csv", f"userId,movieId,rating,timestamp\n1,1,4.0,{T0}\n1,3,4.0,{T0 + 7}\n"),
    "yoochoose": ("clicks.dat", "1,2026-01-01T12:00:00.000Z,214536502,0\n"
                                "1,2026-01-01T12:00:07.000Z,214536500,S\n"),
    "diginetica": ("train-item-views.csv", "sessionId;userId;itemId;timeframe;eventdate\n"
                                           "1;NA;81766;43200000;2026-01-01\n1;NA;31331;43207000;2026-01-01\n"),
}


@pytest.mark.parametrize("preset", sorted(PRESET_FILES))
def test_presets(tmp_path, preset):
    name, text = PRESET_FILES[preset]
    src = write(tmp_path / name, text)
    root = tmp_path / "data"
    report = run([src], root, preset=preset)
    assert report.events_written == 2 and report.quarantined == {}
    ev = events(root)
    assert ev["ts"].sort().to_list() == [_ts(T0), _ts(T0 + 7)]
    assert ev.schema["user_id"] == pl.Int64 and ev.schema["item_id"] == pl.Int64


def test_preset_with_wrong_header_names_file_and_column(tmp_path):
    from recsys.data.ingest import IngestError

    src = write(tmp_path / "ratings.csv", f"user,movieId,rating,timestamp\n1,1,4.0,{T0}\n")
    with pytest.raises(IngestError, match=r"ratings\.csv.*expected 'userId,movieId,rating,timestamp'.*found "
                                          r"'user,movieId,rating,timestamp'"):
        run([src], tmp_path / "data", preset="movielens-csv")


@pytest.mark.parametrize(
    ("value", "settings", "expected"),
    [
        (str(T0), {}, _ts(T0)),
        (str(T0 * 1000 + 250), {}, datetime(2026, 1, 1, 12, 0, 0, 250_000, tzinfo=UTC)),
        (f"{T0}.5", {}, datetime(2026, 1, 1, 12, 0, 0, 500_000, tzinfo=UTC)),
        (str(T0 * 1000), {"ts_unit": "ms"}, _ts(T0)),
        ("2026-01-01T12:00:00Z", {}, _ts(T0)),
        ("2026-01-01T14:00:00+02:00", {}, _ts(T0)),
        ("2026-01-01 12:00:00.125", {}, datetime(2026, 1, 1, 12, 0, 0, 125_000, tzinfo=UTC)),
        ("2026-01-01T13:00:00", {"timezone": "Europe/Berlin"}, _ts(T0)),
        ("2026-01-01", {"ts_unit": "iso"}, datetime(2026, 1, 1, tzinfo=UTC)),
    ],
)
def test_timestamp_encodings(tmp_path, value, settings, expected):
    src = write(tmp_path / "log.csv", f"user_id,item_id,ts\n1,2,{value}\n")
    root = tmp_path / "data"
    assert run([src], root, **settings).events_written == 1
    assert events(root)["ts"].to_list() == [expected]


def test_quoted_fields_and_crlf(tmp_path):
    src = tmp_path / "log.csv"
    src.write_bytes(f'"user_id","item_id","ts"\r\n"a ""b""",7,{T0}\r\n'.encode())
    root = tmp_path / "data"
    assert run([src], root).events_written == 1
    assert events(root)["user_id"].to_list() == ['a "b"']


def test_id_type_follows_existing_events(tmp_path):
    root = tmp_path / "data"
    run([write(tmp_path / "a.csv", f"user_id,item_id,ts\n1,2,{T0}\n")], root)
    # a later file whose ids happen to be strings must not change the stored type: bad ids quarantined
    report = run([write(tmp_path / "b.csv", f"user_id,item_id,ts\n1,x,{T0 + 86_400}\n1,3,{T0 + 86_400}\n")],
                 root, max_bad_fraction=1.0)
    assert report.quarantined == {"bad_item_id": 1} and report.item_id_type == "int"


def test_mixed_iso_encodings_in_one_file(tmp_path):
    body = "".join(f"{u},1,2026-01-01T12:00:0{u}Z\n" for u in range(1, 6))
    src = write(tmp_path / "log.csv", "user_id,item_id,ts\n" + body
                + "9,1,2026-01-01T14:00:00+02:00\n9,2,2026-02-30T25:61:00Z\n")
    root = tmp_path / "data"
    report = run([src], root, max_bad_fraction=1.0)
    assert report.events_written == 6 and report.quarantined == {"bad_ts": 1}
    assert events(root).filter(user_id=9)["ts"].to_list() == [_ts(T0)]


def test_ndjson_keeps_raw_lines_and_quarantines_bad_json_past_the_sample(tmp_path, monkeypatch):
    from recsys.data import ingest, readers

    good = [f'{{"user_id": {u}, "item_id": 1, "ts": {T0 + u}}}' for u in range(1, 6)]
    bad_value = f'{{"user_id": null, "item_id": 1, "ts": {T0}}}'
    clean = write(tmp_path / "clean.ndjson", "\n".join([*good, bad_value]))
    root = tmp_path / "data"
    report = run([clean], root, max_bad_fraction=1.0)
    assert report.events_written == 5 and report.quarantined == {"null_user_id": 1}
    q = pl.read_parquet(next((root / "quarantine").glob("*.parquet")))
    assert q.rows() == [(str(clean), 6, "null_user_id", bad_value)]
    # a malformed line far past the samples is one quarantined row
    monkeypatch.setattr(readers, "SAMPLE_LINES", 2)
    monkeypatch.setattr(ingest, "SAMPLE_ROWS", 2)
    many = [f'{{"user_id": {u % 50}, "item_id": {u}, "ts": {T0 + u}}}' for u in range(20_000)]
    broken = write(tmp_path / "broken.ndjson", "\n".join([*many, "{oops"]) + "\n")
    report = run([broken], tmp_path / "data2", max_bad_fraction=1.0)
    assert report.rows_in == 20_001 and report.events_written == 20_000
    assert report.quarantined == {"malformed_json": 1}


@pytest.mark.parametrize("id_type", ["str", "int"])
def test_ndjson_ids_are_the_same_whichever_reader_reads_the_file(tmp_path, id_type, caplog):
    """A clean file is decoded in one pass; a malformed line sends the whole file to the line-by-line
    reader. Both must keep and reject exactly the same ids."""
    import json

    ids = [7, "7", "007", 7.0, "7.0", -5, 0, 12345678901234567890123, 18446744073709551615,
           9223372036854775808, -9223372036854775809, 1e3, True, None, "", "  x ", 'a\u00e9\n"q']
    lines = [json.dumps({"user_id": v, "item_id": i, "ts": T0 + i}) for i, v in enumerate(ids)]
    lines += [json.dumps({"user_id": "u", "item_id": v, "ts": T0 + i}) for i, v in enumerate(ids)]
    lines += ['{"user_id": -0, "item_id": 1, "ts": 1767268800}', "", "null"]
    clean = write(tmp_path / "clean.ndjson", "\n".join(lines) + "\n")
    broken = write(tmp_path / "broken.ndjson", "\n".join([*lines, "{oops"]) + "\n")
    caplog.set_level("INFO", logger="recsys.data.ingest")
    a = run([clean], tmp_path / "a", max_bad_fraction=1.0, user_id_type=id_type, item_id_type=id_type)
    assert "reading line by line" not in caplog.text  # decoded in one pass
    b = run([broken], tmp_path / "b", max_bad_fraction=1.0, user_id_type=id_type, item_id_type=id_type)
    assert "reading line by line" in caplog.text
    assert b.quarantined == {**a.quarantined, "malformed_json": a.quarantined.get("malformed_json", 0) + 1}
    assert events(tmp_path / "a").rows() == events(tmp_path / "b").rows()
    assert a.quarantined["bad_user_id"] >= 6 and a.quarantined["bad_item_id"] >= 5  # 7.0, 1e3, true, ...
    if id_type == "str":
        kept = set(events(tmp_path / "a")["user_id"].to_list())
        assert {"7", "007", "7.0", "-5", "0", "18446744073709551615", "x", 'a\u00e9\n"q'} <= kept
        assert not kept & {"7.0000", "1000", "1000.0", "true", "-0", "12345678901234567890123"}


def test_separators_inside_quotes(tmp_path):
    src = write(tmp_path / "log.csv",
                "user_id,item_id,ts,event_type\n"
                f'"Doe, John",7,{T0},"play, resumed"\n'
                f'"Roe ""RJ"" Jané",8,{T0},play\n'
                f'"open quote,9,{T0},play\n'
                f'x,1,{T0},a,b\n')
    root = tmp_path / "data"
    report = run([src], root, max_bad_fraction=1.0)
    assert report.quarantined == {"wrong_field_count": 2}
    ev = events(root).sort("item_id")
    assert ev["user_id"].to_list() == ["Doe, John", 'Roe "RJ" Jané']
    assert ev["event_type"].to_list() == ["play, resumed", "play"]
