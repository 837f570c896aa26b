"""Input readers: file formats, presets for public datasets, and the raw-field frame they all produce.

Every reader returns a lazy frame with the same shape so that validation has one code path:

- ``_row``   1-based data row in its file (for text: line number minus header lines; blank lines keep
             their numbers, so ``row`` always points at the same line a text editor shows, minus header)
- ``_raw``   the row's original text (the line; for Parquet the mapped columns as JSON)
- ``_shape`` a structural problem found before any field is looked at (wrong field count, bad JSON,
             blank line) or null
- one column per event field present in the input (``user_id``, ``item_id``, ``ts``, optional
  ``ts_offset_ms``, ``watch_seconds``, ``event_type``), still in the input's own type (text: strings).

Text (CSV/TSV/``::``) and NDJSON are read as *lines* and split with polars string expressions, never
with a strict CSV parser: a malformed line then becomes one quarantined row instead of a failed run,
and its text is kept verbatim. Files without a double quote are split with a plain ``splitn``; files
with one use an anchored regex per line that honours CSV quoting (separators inside quotes, ``""``).
A quoted field spanning several lines is not supported: its lines are quarantined, not lost.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import polars as pl

from recsys.config import IngestConfig
from recsys.data.errors import IngestError
from recsys.schemas import EVENT_TYPE, ITEM_ID, TS, USER_ID, WATCH_SECONDS

TS_OFFSET_MS = "ts_offset_ms"  # optional milliseconds added to ts (DIGINETICA's timeframe)
REQUIRED_FIELDS = (USER_ID, ITEM_ID, TS)
OPTIONAL_FIELDS = (WATCH_SECONDS, EVENT_TYPE)
# Internal structural markers; turned into public quarantine reasons in validate.py.
SHAPE_BLANK = "__blank__"
SHAPE_SHORT = "__short__"  # too few fields: "truncated_last_line" on the last row, else wrong count
SHAPE_LONG = "wrong_field_count"
SHAPE_BAD_JSON = "__bad_json__"  # "truncated_last_line" on the last row, else "malformed_json"
SHAPE_BAD_ENCODING = "bad_encoding"  # a line that is not valid UTF-8 (read with U+FFFD replacements)
SAMPLE_LINES = 1000
COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")


@dataclass(frozen=True)
class Preset:
    """A public dataset's file layout: how to split it and which column holds which field."""

    name: str
    separator: str
    has_header: bool
    field_names: tuple[str, ...]  # the columns, in file order (checked against the header if any)
    columns: dict[str, str]  # event field -> input column
    ts_unit: str
    description: str


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("movielens-100k", "\t", False, ("user_id", "item_id", "rating", "timestamp"),
               {USER_ID: "user_id", ITEM_ID: "item_id", TS: "timestamp"}, "s",
               "MovieLens 100K u.data: tab-separated, no header, unix seconds"),
        Preset("movielens-dat", "::", False, ("UserID", "MovieID", "Rating", "Timestamp"),
               {USER_ID: "UserID", ITEM_ID: "MovieID", TS: "Timestamp"}, "s",
               "MovieLens 1M/10M ratings.dat: '::'-separated, no header, unix seconds"),
        Preset("movielens-csv", ",", True, ("userId", "movieId", "rating", "timestamp"),
               {USER_ID: "userId", ITEM_ID: "movieId", TS: "timestamp"}, "s",
               "MovieLens ratings.csv (ml-latest, 20M, 25M, 32M): header userId,movieId,rating,timestamp"),
        Preset("yoochoose", ",", False, ("session_id", "timestamp", "item_id", "category"),
               {USER_ID: "session_id", ITEM_ID: "item_id", TS: "timestamp"}, "iso",
               "YOOCHOOSE clicks.dat: session,ISO-8601 time,item,category; no header; session = user"),
        Preset("diginetica", ";", True, ("sessionId", "userId", "itemId", "timeframe", "eventdate"),
               {USER_ID: "sessionId", ITEM_ID: "itemId", TS: "eventdate", TS_OFFSET_MS: "timeframe"},
               "iso", "DIGINETICA train-item-views.csv: ';'-separated; ts = eventdate + timeframe ms; "
               "session = user"),
    )
}


@dataclass(frozen=True)
class ReadSpec:
    """How one input file is read, resolved from config, preset and file name."""

    kind: str  # "text" | "parquet" | "ndjson"
    separator: str = ","
    has_header: bool = True
    field_names: tuple[str, ...] = ()  # headerless text: names of the positional columns
    columns: dict[str, str] = field(default_factory=dict)  # event field -> input column (required ones)
    optional_columns: dict[str, str] = field(default_factory=dict)  # used when present in the input
    ts_unit: str = "auto"
    preset: str | None = None


@dataclass
class RawInput:
    """A scanned input: the raw-field frame plus what was learnt about the file while opening it."""

    path: Path
    spec: ReadSpec
    frame: pl.LazyFrame
    fields: list[str]  # event fields present as columns of ``frame``
    ends_with_newline: bool | None = None  # None: unknown (compressed) or not text
    # Parquet: ``_row`` -> ``_raw`` (row as JSON), looked up for the few bad rows only, because
    # encoding every row as JSON would cost more than the whole validation.
    raw_lookup: pl.LazyFrame | None = None
    # A fast reader that may fail mid-file (NDJSON via polars' JSON reader): the robust reader to
    # stage the file with instead.
    fallback: Callable[[], RawInput] | None = None
    # About how many rows the input holds (exact for Parquet, from the sampled line lengths for plain
    # text); None when unknown (compressed text). Small inputs are staged in memory.
    rows_estimate: int | None = None


def _ends_with_newline(path: Path) -> bool | None:
    """Whether a plain text file ends with a newline (cheap: one byte); None for compressed files.

    A short last row is called "truncated_last_line" unless the file is known to end cleanly.
    """
    if path.name.lower().endswith(COMPRESSED_SUFFIXES):
        return None
    with path.open("rb") as fh:
        fh.seek(0, 2)
        if fh.tell() == 0:
            return None
        fh.seek(-1, 2)
        return fh.read(1) == b"\n"


def _strip_compression(name: str) -> str:
    for suffix in COMPRESSED_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def detect_kind(path: Path, config: IngestConfig) -> tuple[str, str | None]:
    """(kind, separator) from ``ingest.format``, else from the file name; directories are Parquet."""
    fmt = config.format
    if fmt == "auto":
        if path.is_dir():
            return "parquet", None
        ext = Path(_strip_compression(path.name)).suffix.lower()
        by_ext = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet",
                  ".ndjson": "ndjson", ".jsonl": "ndjson", ".json": "ndjson"}
        fmt = by_ext.get(ext, "text?")
    if fmt == "csv":
        return "text", config.separator or ","
    if fmt == "tsv":
        return "text", config.separator or "\t"
    if fmt == "text?":
        if config.separator is None:
            raise IngestError(
                f"{path}: cannot tell the format from the file name; set ingest.format "
                "(csv|tsv|parquet|ndjson), ingest.separator, or a preset (--preset)"
            )
        return "text", config.separator
    return fmt, None


def resolve_spec(path: Path, config: IngestConfig) -> ReadSpec:
    """Combine preset, config and file name into the reading recipe for ``path``."""
    if config.preset is not None:
        preset = PRESETS[config.preset]
        if path.is_dir() or _strip_compression(path.name).lower().endswith((".parquet", ".pq")):
            raise IngestError(f"{path}: preset {preset.name} reads text files ({preset.description}); "
                              "drop --preset for Parquet input")
        return ReadSpec("text", preset.separator, preset.has_header, preset.field_names,
                        dict(preset.columns), {}, preset.ts_unit, preset.name)
    kind, separator = detect_kind(path, config)
    mapping = config.columns
    required = {USER_ID: mapping.user_id, ITEM_ID: mapping.item_id, TS: mapping.ts}
    if mapping.ts_offset_ms:
        required[TS_OFFSET_MS] = mapping.ts_offset_ms
    optional = {f: c for f, c in ((WATCH_SECONDS, mapping.watch_seconds),
                                  (EVENT_TYPE, mapping.event_type)) if c}
    return ReadSpec(kind, separator or ",", config.has_header, (), required, optional, config.ts_unit)


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise IngestError(f"{path}: no such file or directory")
    if path.is_dir():
        return
    try:
        with path.open("rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise IngestError(f"{path}: cannot read the file: {exc}") from exc


class _NotUtf8(Exception):
    """The text input holds bytes that are not UTF-8: read it through a lossy copy instead."""


def _read_lines(path: Path, query: pl.LazyFrame) -> pl.DataFrame:
    try:
        return query.collect()
    except Exception as exc:  # polars raises several error types for corrupt/compressed input
        if "utf8" in str(exc).lower() or "utf-8" in str(exc).lower():
            raise _NotUtf8(str(exc)) from exc
        raise IngestError(f"{path}: cannot read the file as text lines: {exc}") from exc


def _sample_lines(path: Path, src: Path) -> list[str]:
    return _read_lines(path, pl.scan_lines(src, n_rows=SAMPLE_LINES))["line"].to_list()


def _open_binary(path: Path) -> IO[bytes]:
    name = path.name.lower()
    if name.endswith(".gz"):
        import gzip

        return gzip.open(path, "rb")
    if name.endswith((".zst", ".zstd")):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(path.open("rb"))
    return path.open("rb")


def lossy_utf8_copy(path: Path, dest: Path, chunk: int = 1 << 22) -> Path:
    """Decompress and re-encode ``path`` as UTF-8, invalid bytes replaced by U+FFFD (streamed)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _open_binary(path) as fin, dest.open("w", encoding="utf-8", newline="") as fout:
        while block := fin.read(chunk):
            fout.write(decoder.decode(block))
        fout.write(decoder.decode(b"", final=True))
    return dest


def _missing(path: Path, spec: ReadSpec, available: list[str]) -> None:
    for fld, col in spec.columns.items():
        if col not in available:
            raise IngestError(
                f"{path}: required column {col!r} (for {fld}) not found; the file has columns "
                f"{available}" + ("" if spec.preset is None else f" (preset {spec.preset})")
            )


def _unquote(name: str) -> pl.Expr:
    """Trim a text field matched by ``_csv_line_pattern`` and remove CSV quotes around it.

    That pattern guarantees a field starting with a quote ends with one. Takes a column name, not an
    expression: polars would re-run an expression at each of its uses here.
    """
    e = pl.col(name).str.strip_chars()
    inner = e.str.strip_prefix('"').str.strip_suffix('"').str.replace_all('""', '"', literal=True)
    return pl.when(e.str.starts_with('"')).then(inner).otherwise(e).alias(name)


def _csv_line_pattern(sep: str, n: int) -> str:
    """Regex matching a line of exactly ``n`` CSV fields: quoted ("" escapes a quote) or bare."""
    e = "".join(f"\\x{{{ord(c):x}}}" for c in sep)  # hex escape: valid in and out of [...] classes
    one = rf'(\s*"(?:[^"]|"")*"\s*|(?:[^"{e}][^{e}]*)?)'
    return "^" + e.join([one] * n) + "$"


def _rows_estimate(src: Path, sample: list[str]) -> int | None:
    """Lines in a plain text file: its size over the mean size of the sampled lines."""
    if not sample or src.name.lower().endswith(COMPRESSED_SUFFIXES):
        return None
    mean = sum(len(line.encode()) + 1 for line in sample) / len(sample)
    return round(src.stat().st_size / mean)


def _header_names(line: str, separator: str) -> list[str]:
    line = line.lstrip("\ufeff")
    return [n.strip().strip('"').strip() for n in line.split(separator)]


def _scan_text(path: Path, spec: ReadSpec, src: Path, lossy: bool) -> RawInput:
    sample = _sample_lines(path, src)
    nonblank = [s for s in sample if s.strip()]
    if not nonblank:
        raise IngestError(f"{path}: empty input (no lines)")
    sep = spec.separator
    if spec.has_header:
        names = _header_names(sample[0], sep)
        if spec.preset is not None:
            _missing(path, spec, names)
    elif spec.field_names:
        names = list(spec.field_names)
    else:
        body = nonblank[1:] if spec.has_header else nonblank
        width = Counter(len(s.split(sep)) for s in body).most_common(1)[0][0]
        names = [f"column_{i + 1}" for i in range(width)]
    _missing(path, spec, names)
    n = len(names)
    line = pl.col("line")
    parts = line.str.splitn(sep, n + 1)
    # CSV quoting costs a regex per line: only pay for it when the file has a quote at all.
    # (this full pass also proves the whole file is UTF-8 before anything is staged)
    has_quote = pl.scan_lines(src).select(line.str.contains('"', literal=True).any())
    quoted = _read_lines(path, has_quote).item()
    cols = {**spec.columns, **{f: c for f, c in spec.optional_columns.items() if c in names}}
    lf = pl.scan_lines(src, row_index_name="_line").with_columns(pl.col("_line").cast(pl.Int64))
    if spec.has_header:
        lf = lf.filter(pl.col("_line") >= 1).with_columns(_row=pl.col("_line"))
    else:
        lf = lf.with_columns(_row=pl.col("_line") + 1)
    # The split is materialised as a column first so that each line is split once.
    lf = lf.with_columns(parts.alias("_parts"))
    parts = pl.col("_parts")
    short = parts.struct.field(f"field_{n - 1}").is_null()
    none = pl.lit(None, dtype=pl.String)
    csv_quoting = quoted and len(sep) == 1
    if csv_quoting:
        # CSV quoting: one anchored regex per line splits on separators outside quotes; a line it
        # does not match has the wrong number of fields (or an unterminated quote).
        lf = lf.with_columns(line.str.extract_groups(_csv_line_pattern(sep, n)).alias("_groups"))
        groups = pl.col("_groups")
        fields = [groups.struct.field(str(i + 1)) for i in range(n)]
        malformed = groups.struct.field("1").is_null()
        structural = (pl.when(malformed & short).then(pl.lit(SHAPE_SHORT))
                      .when(malformed).then(pl.lit(SHAPE_LONG)).otherwise(none))
    else:
        fields = [parts.struct.field(f"field_{i}") for i in range(n)]
        structural = (pl.when(short).then(pl.lit(SHAPE_SHORT))
                      .when(parts.struct.field(f"field_{n}").is_not_null()).then(pl.lit(SHAPE_LONG))
                      .otherwise(none))
    shape = (
        pl.when(line.str.contains(r"^\s*$")).then(pl.lit(SHAPE_BLANK))
        .when(_bad_encoding(lossy)).then(pl.lit(SHAPE_BAD_ENCODING))
        .otherwise(structural)
    )
    frame = lf.select(
        pl.col("_row"),
        line.alias("_raw"),
        shape.alias("_shape"),
        *[fields[names.index(c)].alias(f) for f, c in cols.items()],
    )
    if csv_quoting:
        frame = frame.with_columns([_unquote(f) for f in cols])
    return RawInput(path, spec, frame, list(cols), _ends_with_newline(path),
                    rows_estimate=_rows_estimate(src, sample))


def _json_path(name: str) -> str:
    return f"$.{name}" if name.isidentifier() else "$['" + name.replace("'", "\\'") + "']"


def _bad_encoding(lossy: bool) -> pl.Expr:
    return pl.col("line").str.contains("\ufffd", literal=True) if lossy else pl.lit(False)


def _scan_ndjson(path: Path, spec: ReadSpec, src: Path, lossy: bool) -> RawInput:
    sample = [s for s in _sample_lines(path, src) if s.strip()]
    if not sample:
        raise IngestError(f"{path}: empty input (no lines)")
    present = [c for c in {*spec.columns.values(), *spec.optional_columns.values()}
               if any(f'"{c}"' in s for s in sample)]
    _missing(path, spec, present)
    cols = {**spec.columns, **{f: c for f, c in spec.optional_columns.items() if c in present}}
    line = pl.col("line")
    blanks = _read_lines(path, pl.scan_lines(src).select(line.str.contains(r"^\s*$").sum())).item()
    robust = _ndjson_lines(path, spec, src, lossy, cols)
    robust.rows_estimate = _rows_estimate(src, sample)
    if blanks or lossy or any(not _is_json_object(s) for s in sample):
        return robust
    # Fast path: polars' JSON reader (~5x faster) gives every field as text; it has no row-level error
    # handling, so a malformed line anywhere makes staging fall back to the line-by-line reader.
    fast = pl.scan_ndjson(src, schema={c: pl.String for c in cols.values()}, row_index_name="_row",
                          row_index_offset=1)
    frame = fast.select(
        pl.col("_row").cast(pl.Int64),
        pl.lit(None, dtype=pl.String).alias("_raw"),
        pl.lit(None, dtype=pl.String).alias("_shape"),
        *[pl.col(c).alias(f) for f, c in cols.items()],
    )
    lookup = pl.scan_lines(src, row_index_name="_row", row_index_offset=1).select(
        pl.col("_row").cast(pl.Int64), line.alias("_raw"))
    return RawInput(path, spec, frame, list(cols), _ends_with_newline(path), raw_lookup=lookup,
                    fallback=lambda: robust, rows_estimate=robust.rows_estimate)


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _ndjson_lines(path: Path, spec: ReadSpec, src: Path, lossy: bool, cols: dict[str, str]) -> RawInput:
    """NDJSON read line by line: a malformed line is one quarantined row."""
    line = pl.col("line")
    shape = (
        pl.when(line.str.contains(r"^\s*$")).then(pl.lit(SHAPE_BLANK))
        .when(_bad_encoding(lossy)).then(pl.lit(SHAPE_BAD_ENCODING))
        .when(line.str.json_path_match("$").is_null()).then(pl.lit(SHAPE_BAD_JSON))
        .otherwise(pl.lit(None, dtype=pl.String))
    )
    frame = (
        pl.scan_lines(src, row_index_name="_line")
        .select(
            (pl.col("_line").cast(pl.Int64) + 1).alias("_row"),
            line.alias("_raw"),
            shape.alias("_shape"),
            *[line.str.json_path_match(_json_path(c)).alias(f) for f, c in cols.items()],
        )
    )
    return RawInput(path, spec, frame, list(cols), _ends_with_newline(path))


def _scan_parquet(path: Path, spec: ReadSpec) -> RawInput:
    if path.is_dir():
        if not any(path.rglob("*.parquet")):
            raise IngestError(f"{path}: directory holds no *.parquet files")
        lf = pl.scan_parquet(str(path / "**" / "*.parquet"), hive_partitioning=True)
    else:
        lf = pl.scan_parquet(path)
    try:
        names = list(lf.collect_schema().names())
        rows = int(lf.select(pl.len()).collect().item())  # from the footers
    except Exception as exc:
        raise IngestError(f"{path}: cannot read as Parquet: {exc}") from exc
    _missing(path, spec, names)
    cols = {**spec.columns, **{f: c for f, c in spec.optional_columns.items() if c in names}}
    used = list(dict.fromkeys(cols.values()))
    indexed = lf.with_row_index("_row", offset=1).with_columns(pl.col("_row").cast(pl.Int64))
    frame = indexed.select(
        pl.col("_row"),
        pl.lit(None, dtype=pl.String).alias("_raw"),
        pl.lit(None, dtype=pl.String).alias("_shape"),
        *[pl.col(c).alias(f) for f, c in cols.items()],
    )
    lookup = indexed.select(pl.col("_row"), pl.struct(used).struct.json_encode().alias("_raw"))
    return RawInput(path, spec, frame, list(cols), raw_lookup=lookup, rows_estimate=rows)


def scan_input(path: Path, config: IngestConfig, work: Path) -> RawInput:
    """Open one input (file or Parquet directory) as a raw-field frame; file-level problems raise.

    A text file that is not valid UTF-8 is read through a lossy copy in ``work``, and its lines with
    replaced bytes are quarantined as ``bad_encoding`` instead of failing the whole file.
    """
    _check_readable(path)
    spec = resolve_spec(path, config)
    if spec.kind == "parquet":
        return _scan_parquet(path, spec)
    if path.is_dir():
        raise IngestError(f"{path}: is a directory; only Parquet inputs may be directories")
    scan = _scan_ndjson if spec.kind == "ndjson" else _scan_text
    try:
        return scan(path, spec, path, False)
    except _NotUtf8:
        copy = lossy_utf8_copy(path, work / "utf8" / f"{len(list(work.glob('utf8/*')))}-{path.name}.txt")
        return scan(path, spec, copy, True)
