"""The item catalogue: MovieLens and generator inputs map to one table; bad rows are quarantined, not lost."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from recsys.config import load_config
from recsys.data.catalogue import (
    ingest_catalogue,
    load_catalogue,
    read_catalogue_source,
    titles_frame,
    validate_catalogue,
)
from recsys.data.errors import IngestError
from recsys.data.synthetic import generate


def _config(root: Path, *extra: str):
    return load_config(None, [f"paths.data_root={root}", *extra])


def test_movielens_u_item_latin1_titles_and_first_genre(tmp_path):
    flags = ["0"] * 19
    drama = flags.copy()
    drama[8] = "1"  # Drama
    action_comedy = flags.copy()
    action_comedy[1] = action_comedy[5] = "1"
    lines = [
        "|".join(["1", "Toy Story (1995)", "01-Jan-1995", "", "http://x", *action_comedy]),
        "|".join(["2", "Café au lait (1994)", "01-Jan-1994", "", "http://y", *drama]),
    ]
    path = tmp_path / "u.item"
    path.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    clean, bad = validate_catalogue(read_catalogue_source(path), str(path))
    assert bad.height == 0
    assert clean["title"].to_list() == ["Toy Story (1995)", "Café au lait (1994)"]
    assert clean["genre"].to_list() == ["Action", "Drama"] and set(clean["kind"]) == {"film"}
    assert clean["release_date"].dt.year().to_list() == [1995, 1994]


def test_movielens_movies_csv(tmp_path):
    path = tmp_path / "movies.csv"
    path.write_text('movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n'
                    '2,"Heat, The (1995)",(no genres listed)\n')
    clean, bad = validate_catalogue(read_catalogue_source(path), str(path))
    assert bad.height == 0 and clean["item_id"].to_list() == [1, 2]
    assert clean["title"][1] == "Heat, The (1995)" and clean["genre"].to_list() == ["Adventure", None]


def test_generator_catalogue_round_trips_and_titles_join(tmp_path):
    config = _config(tmp_path / "data", "generate.n_events=2000")
    generated = generate(config)
    report = ingest_catalogue(Path(generated["catalogue"]), config)
    source = pl.read_parquet(generated["catalogue"])
    cat = load_catalogue(config)
    assert report.items_written == source.height == cat.height and not report.quarantined
    assert cat.select("item_id", "title", "kind", "series_id", "episode").equals(
        source.select("item_id", "title", "kind", "series_id", "episode"))
    assert titles_frame(cat).columns == ["item_id", "title"]
    assert load_catalogue(_config(tmp_path / "empty")) is None  # optional everywhere


def test_bad_rows_are_quarantined_with_row_and_reason(tmp_path):
    path = tmp_path / "items.csv"
    path.write_text(
        "item_id,title,kind,series_id,season,episode,genre,release_date,duration_seconds\n"
        "10,Good,film,,,,drama,2026-01-05,5400\n"  # row 1
        ",No id,film,,,,drama,2026-01-05,5400\n"  # row 2
        "11,Bad date,film,,,,drama,2026-13-45,5400\n"  # row 3
        "12,Negative,film,,,,drama,2026-01-05,-3\n"  # row 4
        "13,Odd kind,podcast,,,,drama,2026-01-05,60\n"  # row 5
        "14,Orphan episode,series,,1,2,drama,2026-01-05,60\n"  # row 6
        "10,Duplicate,film,,,,drama,2026-01-05,5400\n"  # row 7
        "15,Episode,series,3,1,1,drama,,1500\n"  # row 8
    )
    config = _config(tmp_path / "data", "ingest.max_bad_fraction=0.9")
    report = ingest_catalogue(path, config)
    assert report.items_written == 2 and report.rows_in == 8
    q = pl.read_parquet(report.quarantine_file)
    assert dict(zip(q["row"].to_list(), q["reason"].to_list(), strict=True)) == {
        2: "null_item", 3: "bad_release_date", 4: "bad_duration", 5: "bad_kind", 6: "series_without_id",
        7: "duplicate_item"}
    assert set(q["source"]) == {str(path)} and q["raw"][0].startswith("|No id|film")
    cat = load_catalogue(config)
    assert cat["item_id"].to_list() == [10, 15] and cat["release_date"][1] is None


def test_too_many_bad_rows_fail_naming_the_file_and_keep_the_previous_catalogue(tmp_path):
    config = _config(tmp_path / "data")
    good = tmp_path / "good.csv"
    good.write_text("item_id,title\n1,A\n2,B\n")
    ingest_catalogue(good, config)
    bad = tmp_path / "bad.csv"
    bad.write_text("item_id,title,kind\n1,A,film\n,B,film\n3,C,podcast\n")
    with pytest.raises(IngestError, match=r"bad\.csv: 2 of 3 catalogue rows are bad .*row 2: null_item"):
        ingest_catalogue(bad, config)
    assert load_catalogue(config)["title"].to_list() == ["A", "B"]


def test_export_title_column_keeps_rows_and_reads_beside_older_partitions(tmp_path):
    from recsys.serving.export import with_titles

    recs = pl.DataFrame({"user_id": [1, 1, 2], "rank": [1, 2, 1], "item_id": [10, 99, 10]})
    titled = with_titles(recs, pl.DataFrame({"item_id": ["10", "10"], "title": ["Ten", "Dup"]}))
    assert titled.select("user_id", "rank", "item_id").equals(recs)  # order and rows unchanged
    assert titled["title"].to_list() == ["Ten", None, "Ten"]
    old, new = tmp_path / "a.parquet", tmp_path / "b.parquet"
    recs.write_parquet(old)
    titled.write_parquet(new)
    mixed = pl.concat([pl.scan_parquet(new), pl.scan_parquet(old)], how="diagonal_relaxed").collect()
    assert mixed.height == 6 and mixed["title"].null_count() == 4
