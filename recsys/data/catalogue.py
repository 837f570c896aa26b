"""Optional item table (the catalogue): titles for printed lists and exports, metadata for new items.

Why a catalogue at all: a model only knows items it was trained on. A title released yesterday, or the
new season of a followed series, can enter the vocabulary of a daily update (recsys.training.update)
before anyone watched it, with a row initialised from its series, genre and kind. The table:

| column | type | notes |
|---|---|---|
| item_id | as the events' item ids | unique, not null |
| title | str | null allowed |
| kind | "series" / "film" | null allowed (treated as film) |
| series_id, season, episode | int | series episodes only |
| genre | str | the first genre when several are listed |
| release_date | date | null: always available |
| duration_seconds | int | >= 0 |

Inputs: Parquet/CSV with those column names (the synthetic generator's ``catalogue.parquet``), MovieLens
``u.item`` (ml-100k: ``|``-separated, latin-1, genre flags) and ``movies.csv`` (ml-latest-small). The
rules are the events' rules: a row without an item id, with an unreadable release date, a negative
duration, an unknown kind, a series episode without series, or a duplicate id is quarantined (source,
row, reason, raw) and never silently dropped; more than ``ingest.max_bad_fraction`` bad rows fail the run.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from recsys.config import Config
from recsys.data.errors import IngestError
from recsys.data.quarantine import stage_quarantine
from recsys.schemas import ITEM_ID

log = logging.getLogger(__name__)

TITLE, KIND, SERIES_ID, SEASON, EPISODE = "title", "kind", "series_id", "season", "episode"
GENRE, RELEASE_DATE, DURATION = "genre", "release_date", "duration_seconds"
KINDS = ("series", "film")
CATALOGUE_SCHEMA: dict[str, pl.DataType] = {
    TITLE: pl.String(), KIND: pl.String(), SERIES_ID: pl.Int64(), SEASON: pl.Int32(), EPISODE: pl.Int32(),
    GENRE: pl.String(), RELEASE_DATE: pl.Date(), DURATION: pl.Int32(),
}
# ml-100k u.item: id | title | release date | video release date | IMDb URL | 19 genre flags
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
                 "Sci-Fi", "Thriller", "War", "Western")


def episode_order(columns: list[str] | set[str] | tuple[str, ...]) -> list[str]:
    """The columns that put a catalogue's episodes in watch order: series, season (when the catalogue
    has it), episode."""
    return [SERIES_ID, *([SEASON] if SEASON in columns else []), EPISODE]


@dataclass
class CatalogueReport:
    source: str
    rows_in: int
    items_written: int
    quarantined: dict[str, int] = field(default_factory=dict)
    path: str = ""
    quarantine_file: str | None = None


def _read_u_item(path: Path) -> pl.DataFrame:
    """ml-100k ``u.item``: latin-1 text, ``|``-separated, no header; genre = first flagged genre."""
    names = ["item_id", "title", "release", "video_release", "url", *[f"g{i}" for i in range(19)]]
    raw = pl.read_csv(path.read_bytes().decode("latin-1").encode(), separator="|", has_header=False,
                      new_columns=names, infer_schema=False, quote_char=None, truncate_ragged_lines=True)
    flags = pl.concat_list([pl.when(pl.col(f"g{i}") == "1").then(pl.lit(g)) for i, g in
                            enumerate(ML100K_GENRES)]).list.drop_nulls()
    return raw.select(
        pl.col("item_id"), pl.col("title"), pl.lit("film").alias(KIND),
        flags.list.first().alias(GENRE),
        pl.col("release").str.strip_chars().alias(RELEASE_DATE),
    )


def _read_movies_csv(path: Path) -> pl.DataFrame:
    """ml-latest-small ``movies.csv`` (movieId, title, genres "A|B"); genre = the first listed."""
    raw = pl.read_csv(path, infer_schema=False)
    first = pl.col("genres").str.split("|").list.first()
    return raw.select(
        pl.col("movieId").alias(ITEM_ID), pl.col("title"), pl.lit("film").alias(KIND),
        pl.when(first == "(no genres listed)").then(None).otherwise(first).alias(GENRE),
    )


def read_catalogue_source(path: Path) -> pl.DataFrame:
    """Any supported catalogue file as text columns (validation follows): Parquet, CSV, u.item, movies.csv."""
    path = Path(path)
    if not path.is_file():
        raise IngestError(f"{path}: catalogue file does not exist")
    if path.name == "u.item":
        return _read_u_item(path)
    if path.suffix == ".parquet":
        frame = pl.read_parquet(path)
        return frame.with_columns(pl.all().cast(pl.String))
    frame = pl.read_csv(path, infer_schema=False)
    if {"movieId", "genres"} <= set(frame.columns):
        return _read_movies_csv(path)
    return frame


def _parse_date(text: pl.Expr) -> pl.Expr:
    """ISO dates (2026-01-31) and MovieLens ones (01-Jan-1995); unparseable -> null."""
    return pl.coalesce(text.str.to_date("%Y-%m-%d", strict=False), text.str.to_date("%d-%b-%Y", strict=False))


def validate_catalogue(raw: pl.DataFrame, source: str, item_dtype: pl.DataType | None = None
                       ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(clean catalogue, quarantined rows): one reason per rejected row, the first failing rule."""
    if ITEM_ID not in raw.columns:
        raise IngestError(f"{source}: catalogue has no {ITEM_ID!r} column (columns: {raw.columns})")
    frame = raw.with_row_index("_row", offset=1)
    text = {c: (pl.col(c).cast(pl.String).str.strip_chars() if c in raw.columns else pl.lit(None, pl.String))
            for c in [ITEM_ID, *CATALOGUE_SCHEMA]}
    id_dtype = item_dtype or (pl.Int64 if raw[ITEM_ID].cast(pl.String).str.strip_chars()
                              .str.contains(r"^-?\d+$").fill_null(True).all() else pl.String)
    kind = text[KIND].str.to_lowercase()
    date_text = text[RELEASE_DATE]
    parsed = frame.select(
        "_row",
        text[ITEM_ID].cast(id_dtype, strict=False).alias(ITEM_ID),
        text[TITLE].alias(TITLE),
        pl.when(kind.is_null() | (kind == "")).then(pl.lit("film")).otherwise(kind).alias(KIND),
        text[SERIES_ID].cast(pl.Int64, strict=False).alias(SERIES_ID),
        text[SEASON].cast(pl.Int32, strict=False).alias(SEASON),
        text[EPISODE].cast(pl.Int32, strict=False).alias(EPISODE),
        pl.when(text[GENRE] == "").then(None).otherwise(text[GENRE]).alias(GENRE),
        _parse_date(date_text).alias(RELEASE_DATE),
        text[DURATION].cast(pl.Float64, strict=False).alias(DURATION),
        (date_text.is_not_null() & (date_text != "")).alias("_has_date"),
        (text[DURATION].is_not_null() & (text[DURATION] != "")).alias("_has_duration"),
        pl.concat_str([pl.col(c).cast(pl.String).fill_null("") for c in raw.columns], separator="|")
        .alias("raw"),
    )
    reason = (
        pl.when(pl.col(ITEM_ID).is_null()).then(pl.lit("null_item"))
        .when(pl.col("_has_date") & pl.col(RELEASE_DATE).is_null()).then(pl.lit("bad_release_date"))
        .when(pl.col("_has_duration") & (pl.col(DURATION).is_null() | (pl.col(DURATION) < 0)))
        .then(pl.lit("bad_duration"))
        .when(~pl.col(KIND).is_in(KINDS)).then(pl.lit("bad_kind"))
        .when((pl.col(KIND) == "series") & pl.col(SERIES_ID).is_null()).then(pl.lit("series_without_id"))
        .when(pl.col(ITEM_ID).is_duplicated() & (pl.int_range(pl.len()).over(ITEM_ID) > 0))
        .then(pl.lit("duplicate_item"))
    )
    checked = parsed.with_columns(reason.alias("reason"))
    bad = checked.filter(pl.col("reason").is_not_null()).select(
        pl.lit(source).alias("source"), pl.col("_row").cast(pl.Int64).alias("row"), "reason", "raw")
    clean = checked.filter(pl.col("reason").is_null()).select(
        ITEM_ID, *[pl.col(c).cast(t) for c, t in CATALOGUE_SCHEMA.items()])
    return clean, bad


def _events_item_dtype(config: Config) -> pl.DataType | None:
    """The item id type already in the events store, so catalogue ids join with events ids."""
    files = sorted(config.paths.events_dir.rglob("*.parquet"))[:1]
    return pl.read_parquet_schema(files[0]).get(ITEM_ID) if files else None


def ingest_catalogue(path: Path, config: Config, out: Path | None = None) -> CatalogueReport:
    """Validate ``path`` and publish it as ``paths.catalogue_file`` (atomic); bad rows to the quarantine."""
    path = Path(path)
    out = Path(out) if out is not None else config.paths.catalogue_file
    raw = read_catalogue_source(path)
    clean, bad = validate_catalogue(raw, str(path), _events_item_dtype(config))
    counts = bad.group_by("reason").len().sort("reason")
    quarantined = dict(zip(counts["reason"].to_list(), counts["len"].to_list(), strict=True))
    limit = config.ingest.max_bad_fraction
    if raw.height and bad.height / raw.height > limit:
        first = bad.row(0, named=True)
        raise IngestError(f"{path}: {bad.height} of {raw.height} catalogue rows are bad (limit {limit:.0%}); "
                          f"first: row {first['row']}: {first['reason']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".catalogue-", dir=out.parent) as work:
        staged = stage_quarantine(bad, config.paths.quarantine_dir, path, 0, Path(work))
        tmp = Path(work) / out.name
        clean.write_parquet(tmp)
        staged.publish(occurrences=1)
        qfile = staged.dest if staged.tmp is not None else None
        shutil.move(str(tmp), str(out))  # same directory: an atomic rename
    log.info("catalogue %s: %d items, %d quarantined -> %s", path, clean.height, bad.height, out)
    return CatalogueReport(str(path), raw.height, clean.height, quarantined, str(out),
                           str(qfile) if qfile else None)


def load_catalogue(config: Config, path: Path | None = None) -> pl.DataFrame | None:
    """The ingested catalogue, or None when there is none (everything that uses it is optional)."""
    path = Path(path) if path is not None else config.paths.catalogue_file
    return pl.read_parquet(path) if path.is_file() else None


def titles_frame(catalogue: pl.DataFrame | None) -> pl.DataFrame | None:
    """``(item_id, title)`` for joining onto lists and exports; None without a catalogue."""
    if catalogue is None or TITLE not in catalogue.columns:
        return None
    return catalogue.select(ITEM_ID, TITLE).unique(ITEM_ID, keep="first")


def catalogue_summary(report: CatalogueReport) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(report)
