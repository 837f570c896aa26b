"""The synthetic viewing-log generator: deterministic, chunked, atomic, with a strong sequential signal."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from recsys.config import load_config
from recsys.data import synthetic
from recsys.data.synthetic import CATALOGUE_FILE, TS_FORMAT, generate

REPO_CONF = Path(__file__).resolve().parents[2] / "conf"
N_EVENTS = 20_000


def _config(tmp_path: Path, *overrides: str):
    return load_config(REPO_CONF, [f"paths.data_root={tmp_path / 'data'}", f"generate.n_events={N_EVENTS}",
                                   "generate.chunk_events=10000", *overrides])


def _events(out: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted(out.glob("part-*.parquet")))


def _clean(events: pl.DataFrame) -> pl.DataFrame:
    """Rows a validating ingest would keep: ids present, parseable in-period ts, no duplicates."""
    ts = pl.col("ts").str.to_datetime(TS_FORMAT, time_zone="UTC", strict=False)
    return (events.with_columns(ts=ts)
            .filter(pl.col("user_id").is_not_null() & pl.col("item_id").is_not_null()
                    & pl.col("ts").dt.year().is_between(2025, 2027) & (pl.col("watch_seconds") >= 0))
            .unique(["user_id", "item_id", "ts"], keep="first", maintain_order=True))


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    result = generate(_config(tmp), tmp / "out")
    return result, tmp / "out"


def test_same_seed_gives_byte_identical_files_and_other_seed_differs(tmp_path, generated):
    _, first = generated
    again = tmp_path / "again"
    generate(_config(tmp_path), again)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    other = tmp_path / "other"
    generate(_config(tmp_path, "generate.seed=8"), other)
    assert (other / "part-00000.parquet").read_bytes() != (first / "part-00000.parquet").read_bytes()
    assert not _events(other).equals(_events(first))


def test_size_chunks_columns_and_result(generated):
    result, out = generated
    events = _events(out)
    assert events.height == result["events"]
    assert abs(events.height - N_EVENTS) / N_EVENTS < 0.1
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) >= 2 and [str(p) for p in parts] == result["files"]
    for part in parts:  # bounded memory: each file holds about chunk_events rows
        assert pl.read_parquet(part).height < 15_000
    assert events.schema == {"user_id": pl.Int64, "item_id": pl.Int64, "ts": pl.String,
                             "watch_seconds": pl.Float64, "event_type": pl.String}
    assert set(events["event_type"].unique()) <= {"complete", "partial", "resume"}
    assert (out / "_manifest.json").is_file()
    assert not list(out.parent.glob(".out.*"))  # no temp dirs left behind


def test_catalogue_is_consistent_with_the_events(generated):
    result, out = generated
    cat = pl.read_parquet(out / CATALOGUE_FILE)
    assert cat.height == result["items"] and cat["item_id"].is_unique().all()
    assert set(cat["kind"].unique()) == {"series", "film"}
    films = cat.filter(pl.col("kind") == "film")
    assert films.height == result["films"] and films["series_id"].null_count() == films.height
    episodes = cat.filter(pl.col("kind") == "series")
    per_series = episodes.group_by("series_id").agg(
        n=pl.len(), lo=pl.col("episode").min(), hi=pl.col("episode").max(), titles=pl.col("title").n_unique())
    assert per_series.height == result["series"]
    assert (per_series["lo"] == 1).all() and (per_series["hi"] == per_series["n"]).all()
    assert (per_series["titles"] == per_series["n"]).all()
    assert (cat["duration_seconds"] > 0).all() and cat["genre"].null_count() == 0
    clean = _clean(_events(out)).join(cat, on="item_id", how="left")
    assert clean["kind"].null_count() == 0  # every event is a catalogue title
    assert (clean["watch_seconds"] <= clean["duration_seconds"] + 1).all()
    assert (clean["ts"].dt.date() >= clean["release_date"]).all()  # nothing watched before release


def test_binge_signal_next_episode_is_predictable(generated):
    _, out = generated
    cat = pl.read_parquet(out / CATALOGUE_FILE).select("item_id", "series_id", "episode")
    ev = _clean(_events(out)).sort("user_id", "ts").join(cat, on="item_id", how="left", maintain_order="left")
    prev = [pl.col(c).shift().over("user_id").alias(f"prev_{c}") for c in ("item_id", "series_id", "episode")]
    pairs = ev.with_columns(prev).filter(pl.col("prev_item_id").is_not_null())
    next_episode = ((pairs["series_id"] == pairs["prev_series_id"])
                    & (pairs["episode"] == pairs["prev_episode"] + 1)).fill_null(False).mean()
    shuffled = pairs.with_columns(pl.col("item_id").shuffle(seed=1)).join(cat, on="item_id", suffix="_s")
    by_chance = ((shuffled["series_id_s"] == shuffled["prev_series_id"])
                 & (shuffled["episode_s"] == shuffled["prev_episode"] + 1)).fill_null(False).mean()
    assert next_episode > 0.4 and next_episode > 10 * by_chance

    # The most frequent successor of the previous title beats most-popular by a wide margin (hit@10).
    cut = ev["ts"].sort()[int(0.8 * ev.height)]  # temporal split: last 20 % of the events are the test
    train, test = pairs.filter(pl.col("ts") < cut), pairs.filter(pl.col("ts") >= cut)
    popular = train.group_by("item_id").len().sort("len", "item_id", descending=True).head(10)["item_id"]
    pop_hit = test["item_id"].is_in(popular.implode()).mean()
    succ = (train.group_by("prev_item_id", "item_id").len().sort("len", "item_id", descending=True)
            .group_by("prev_item_id", maintain_order=True).head(10).with_columns(hit=pl.lit(True)))
    markov_hit = test.join(succ, on=["prev_item_id", "item_id"], how="left")["hit"].fill_null(False).mean()
    assert markov_hit > 0.4 and markov_hit > 3 * pop_hit


def test_time_of_day_has_an_evening_peak(generated):
    _, out = generated
    hour = _clean(_events(out))["ts"].dt.hour()
    assert hour.is_between(18, 23).mean() > 0.4 > hour.is_between(3, 8).mean() * 4


def test_noise_rows_at_about_noise_fraction(tmp_path):
    result = generate(_config(tmp_path, "generate.noise_fraction=0.02"), tmp_path / "noisy")
    events = _events(tmp_path / "noisy")
    expected = 0.02 * events.height
    assert abs(result["noise_rows"] - expected) < 0.3 * expected
    assert all(v > 0 for v in result["noise"].values())
    bad = events.height - _clean(events).height
    assert abs(bad - result["noise_rows"]) <= 0.05 * result["noise_rows"]  # each noise row is detectable
    unparseable = events["ts"].str.to_datetime(TS_FORMAT, strict=False).null_count()
    assert unparseable >= result["noise"]["bad_ts"] * 0.8
    clean = generate(_config(tmp_path, "generate.noise_fraction=0"), tmp_path / "clean")
    assert clean["noise_rows"] == 0 and _clean(_events(tmp_path / "clean")).height == clean["events"]


def test_killed_run_leaves_previous_output_intact(tmp_path, monkeypatch):
    out = tmp_path / "raw"
    generate(_config(tmp_path), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def failing_write(df, path, fmt):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        df.write_parquet(path)

    monkeypatch.setattr(synthetic, "_write", failing_write)
    with pytest.raises(OSError):
        generate(_config(tmp_path, "generate.seed=99"), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # and no temp dir left behind


@pytest.mark.parametrize("fmt", ["csv", "ndjson"])
def test_text_formats(tmp_path, fmt):
    result = generate(_config(tmp_path, f"generate.format={fmt}", "generate.n_events=5000"), tmp_path / fmt)
    files = sorted((tmp_path / fmt).glob(f"part-*.{fmt}"))
    read = pl.read_csv if fmt == "csv" else pl.read_ndjson
    frame = pl.concat([read(f, infer_schema_length=None) for f in files])
    assert frame.height == result["events"]
    assert frame.columns == ["user_id", "item_id", "ts", "watch_seconds", "event_type"]


def test_cli_generate_prints_summary(tmp_path):
    from recsys.cli import app

    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["generate", "--out", str(out), "--conf", str(REPO_CONF),
                                   "--set", "generate.n_events=5000", "--set", "generate.seed=3"])
    assert res.exit_code == 0, res.output
    assert "events" in res.output and (out / CATALOGUE_FILE).is_file()


@pytest.mark.parametrize("overrides", [("generate.days=1",), ("generate.series_share=0",),
                                       ("generate.series_share=1", "generate.activity_sigma=0"),
                                       ("generate.n_series=1", "generate.n_films=1")])
def test_extreme_settings_still_reach_the_size(tmp_path, overrides):
    result = generate(_config(tmp_path, "generate.n_events=3000", *overrides), tmp_path / "x")
    assert abs(result["events"] - 3000) < 300
    assert _clean(_events(tmp_path / "x")).height > 0.95 * result["events"]
