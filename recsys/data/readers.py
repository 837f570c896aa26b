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
with one use an anchored regex per record that honours RFC 4180 quoting (separators, ``""`` and line
breaks inside quoted fields). A record spans several lines only when a quoted field is still open at
the end of a line (found per line with regexes, then one pass over the lines); a quote that is never
closed within ``MAX_RECORD_LINES`` lines (or at all) is a bad one-line row, so one stray quote cannot
swallow a file.

Ids are kept as written: NDJSON objects, arrays, booleans and non-integer numbers are marked bad per
row; Parquet columns of a type that cannot hold ids or times are an error naming file, column and type.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import polars as pl

from recsys.config import IngestConfig
from recsys.data.errors import IngestError, clip
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
SHAPE_BAD_USER = "bad_user_id"  # NDJSON: the id is an object, array, boolean or non-integer number
SHAPE_BAD_ITEM = "bad_item_id"
SAMPLE_LINES = 1000
MAX_RECORD_LINES = 1000  # a quoted field open for more lines than this is taken for a stray quote
COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")


@dataclass(frozen=True)
class Preset:
    """A public dataset's file layout: how to split it and which column holds which field."""

    name: str
    separator: str
    has_header: bool  # True: a header is required; False: none expected, but a matching one is accepted
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
               "MovieLens ratings.csv (ml-latest, 20M, 25M, 32M): header userId,movieId,rating,timestamp "
               "(snake_case accepted)"),
        Preset("yoochoose", ",", False, ("session_id", "timestamp", "item_id", "category"),
               {USER_ID: "session_id", ITEM_ID: "item_id", TS: "timestamp"}, "iso",
               "YOOCHOOSE clicks.dat: session,ISO-8601 time,item,category; no header (a matching header "
               "line is accepted); session = user"),
        Preset("diginetica", ";", True, ("sessionId", "userId", "itemId", "timeframe", "eventdate"),
               {USER_ID: "sessionId", ITEM_ID: "itemId", TS: "eventdate", TS_OFFSET_MS: "timeframe"},
               "iso", "DIGINETICA train-item-views.csv: ';'-separated, header sessionId;userId;itemId;"
               "timeframe;eventdate or session_id;user_id;item_id;timeframe;eventdate; ts = eventdate + "
               "timeframe ms; session = user"),
    )
}


@dataclass(frozen=True)
class ReadSpec:
    """How one input file is read, resolved from config, preset and file name."""

    kind: str  # "text" | "parquet" | "ndjson"
    separator: str = ","
    has_header: bool | None = True  # None: a preset's optional header (used when it matches)
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
        return ReadSpec("text", preset.separator, True if preset.has_header else None, preset.field_names,
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
        raise IngestError(f"{path}: cannot read the file as text lines: {clip(exc)}") from exc


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


def lossy_utf8_copy(path: Path, dest: Path, chunk: int = 1 << 22) -> tuple[Path, list[int]]:
    """Decompress ``path`` into a UTF-8 copy, invalid bytes replaced by U+FFFD (streamed); the copy and
    the 0-based numbers of the lines that held invalid bytes (a valid U+FFFD in the input is not one)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    bad: list[int] = []
    line_no = 0
    rest = b""
    with _open_binary(path) as fin, dest.open("w", encoding="utf-8", newline="") as fout:
        while True:
            block = fin.read(chunk)
            data = rest + block
            if block:
                cut = data.rfind(b"\n") + 1
                data, rest = data[:cut], data[cut:]
                if not data:
                    rest = data + rest
                    continue
            try:
                fout.write(data.decode("utf-8"))
                line_no += data.count(b"\n")
            except UnicodeDecodeError:
                for raw in data.splitlines(keepends=True):
                    try:
                        fout.write(raw.decode("utf-8"))
                    except UnicodeDecodeError:
                        fout.write(raw.decode("utf-8", errors="replace"))
                        bad.append(line_no)
                    line_no += raw.endswith(b"\n")
            if not block:
                break
    return dest, bad


def _missing(path: Path, spec: ReadSpec, available: list[str]) -> None:
    for fld, col in spec.columns.items():
        if col not in available:
            raise IngestError(
                f"{path}: required column {col!r} (for {fld}) not found; the file has columns "
                f"{clip(available)}" + ("" if spec.preset is None else f" (preset {spec.preset})")
            )


def _unquote(name: str) -> pl.Expr:
    """Trim a text field matched by ``_csv_line_pattern`` and remove CSV quotes around it.

    That pattern guarantees a field starting with a quote ends with one. Takes a column name, not an
    expression: polars would re-run an expression at each of its uses here.
    """
    e = pl.col(name).str.strip_chars()
    inner = e.str.strip_prefix('"').str.strip_suffix('"').str.replace_all('""', '"', literal=True)
    return pl.when(e.str.starts_with('"')).then(inner).otherwise(e).alias(name)


def _hex(sep: str) -> str:
    return "".join(f"\\x{{{ord(c):x}}}" for c in sep)  # hex escape: valid in and out of [...] classes


def _field_pattern(sep: str) -> str:
    e = _hex(sep)
    return rf'(\s*"(?:[^"]|"")*"\s*|(?:[^"{e}][^{e}]*)?)'


def _csv_line_pattern(sep: str, n: int) -> str:
    """Regex matching a record of exactly ``n`` CSV fields: quoted ("" escapes a quote) or bare."""
    return "^" + _hex(sep).join([_field_pattern(sep)] * n) + "$"


def _rows_estimate(src: Path, sample: list[str]) -> int | None:
    """Lines in a plain text file: its size over the mean size of the sampled lines."""
    if not sample or src.name.lower().endswith(COMPRESSED_SUFFIXES):
        return None
    mean = sum(len(line.encode()) + 1 for line in sample) / len(sample)
    return round(src.stat().st_size / mean)


def _split_header(line: str, separator: str) -> list[str]:
    line = line.lstrip("\ufeff")
    return [n.strip().strip('"').strip() for n in line.split(separator)]


def _norm(name: str) -> str:
    """Header names compared across spellings: sessionId == session_id == SessionID."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _header(path: Path, spec: ReadSpec, first: str) -> tuple[list[str], bool, dict[str, str]]:
    """(column names, whether the first line is a header, event field -> column) for a text file."""
    sep = spec.separator
    if spec.preset is None:
        if not spec.has_header:
            return [], False, dict(spec.columns)
        names = _split_header(first, sep)
        dups = sorted(n for n, k in Counter(names).items() if k > 1)
        if dups:
            raise IngestError(f"{path}: the header names {clip(dups)} more than once; rename the columns "
                              f"(header: {clip(first)})")
        return names, True, dict(spec.columns)
    found = _split_header(first, sep)
    expected = [_norm(n) for n in spec.field_names]
    matches = [_norm(n) for n in found[: len(expected)]] == expected and len(found) == len(expected)
    if matches:
        by_norm = {_norm(n): n for n in found}
        return found, True, {f: by_norm[_norm(c)] for f, c in spec.columns.items()}
    if spec.has_header:  # required
        raise IngestError(
            f"{path}: the header does not match preset {spec.preset}: expected "
            f"{clip(sep.join(spec.field_names))!r} (any case, with or without underscores), found "
            f"{clip(first)!r}")
    return list(spec.field_names), False, dict(spec.columns)


def _record_ids(lines: pl.DataFrame, sep: str) -> np.ndarray:
    """Record number of each line: a line continues the record before it while a quoted field is open.

    Per line, regexes tell what the line does from each state (closed: it opens a quoted field it
    does not close; open: it closes the field, and maybe opens another); one pass over the lines then
    follows the state. A field left open for more than MAX_RECORD_LINES lines (a stray quote) makes its
    first line a record of its own and the lines after it are read afresh.
    """
    e, f = _hex(sep), _field_pattern(sep)
    unclosed = r'\s*"(?:[^"]|"")*'
    line = pl.col("line")
    flags = lines.select(
        line.str.contains(rf"^(?:{f}{e})*{unclosed}$").alias("opens"),
        line.str.contains(r'^(?:[^"]|"")*$').alias("stays"),
        line.str.contains(rf'^(?:[^"]|"")*"\s*(?:{e}{f})*{e}{unclosed}$').alias("reopens"),
    )
    opens, stays, reopens = (flags[c].to_numpy() for c in ("opens", "stays", "reopens"))
    n = len(opens)
    starts = np.ones(n, dtype=bool)
    i = 0
    while i < n:
        if not opens[i]:
            i += 1
            continue
        j = i + 1  # line i opens a quoted field: follow it
        while j < n and j - i <= MAX_RECORD_LINES and (stays[j] or reopens[j]):
            j += 1
        if j < n and j - i <= MAX_RECORD_LINES:  # line j closes it: lines i..j are one record
            starts[i + 1: j + 1] = False
            i = j + 1
        else:  # never closed (or not before the end of the file): a stray quote; line i alone
            i += 1
    return np.cumsum(starts)


def _as_records(src: Path, path: Path, sep: str) -> pl.LazyFrame:
    """Lines joined into RFC 4180 records (``_line`` = the record's first line, ``line`` its text)."""
    lines = _read_lines(path, pl.scan_lines(src, row_index_name="_line"))
    ids = _record_ids(lines, sep)
    return (lines.with_columns(pl.Series("_rec", ids))
            .group_by("_rec", maintain_order=True)
            .agg(pl.col("_line").first(), pl.col("line").str.join("\n"))
            .drop("_rec").lazy())


def _scan_text(path: Path, spec: ReadSpec, src: Path, bad_lines: list[int] | None) -> RawInput:
    sample = _sample_lines(path, src)
    nonblank = [s for s in sample if s.strip()]
    if not nonblank:
        raise IngestError(f"{path}: empty input (no lines)")
    sep = spec.separator
    names, has_header, mapping = _header(path, spec, sample[0])
    if not names:
        width = Counter(len(s.split(sep)) for s in nonblank).most_common(1)[0][0]
        names = [f"column_{i + 1}" for i in range(width)]
    spec = ReadSpec(spec.kind, sep, has_header, spec.field_names, mapping, spec.optional_columns,
                    spec.ts_unit, spec.preset)
    _missing(path, spec, names)
    n = len(names)
    line = pl.col("line")
    # CSV quoting costs a regex per line: only pay for it when the file has a quote at all, and the
    # record joining only when some line has an odd number of quotes (a field with a line break).
    # (this full pass also proves the whole file is UTF-8 before anything is staged)
    quotes = _read_lines(path, pl.scan_lines(src).select(
        line.str.contains('"', literal=True).any().alias("any"),
        (line.str.count_matches('"', literal=True) % 2 == 1).any().alias("odd"))).row(0)
    quoted, multiline = quotes[0], quotes[1] and len(sep) == 1
    cols = {**spec.columns, **{f: c for f, c in spec.optional_columns.items() if c in names}}
    if multiline:
        lf = _as_records(src, path, sep)
    else:
        lf = pl.scan_lines(src, row_index_name="_line")
    lf = lf.with_columns(pl.col("_line").cast(pl.Int64))
    if has_header:
        lf = lf.filter(pl.col("_line") >= 1).with_columns(_row=pl.col("_line"))
    else:
        lf = lf.with_columns(_row=pl.col("_line") + 1)
    # The split is materialised as a column first so that each line is split once.
    parts = line.str.splitn(sep, n + 1)
    lf = lf.with_columns(parts.alias("_parts"))
    parts = pl.col("_parts")
    short = parts.struct.field(f"field_{n - 1}").is_null()
    none = pl.lit(None, dtype=pl.String)
    csv_quoting = quoted and len(sep) == 1
    if csv_quoting:
        # CSV quoting: one anchored regex per record splits on separators outside quotes; a record it
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
        .when(_bad_encoding(bad_lines, multiline)).then(pl.lit(SHAPE_BAD_ENCODING))
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


def _bad_encoding(bad_lines: list[int] | None, multiline: bool = False) -> pl.Expr:
    """Lines (0-based ``_line``) that held bytes which are not UTF-8 (a record: its first line)."""
    if not bad_lines:
        return pl.lit(False)
    bad = pl.Series(bad_lines, dtype=pl.Int64).implode()
    if multiline:  # a record is bad when any of its lines is: count its lines from its text
        last = pl.col("_line") + pl.col("line").str.count_matches("\n", literal=True)
        return pl.int_ranges(pl.col("_line"), last + 1).list.eval(pl.element().is_in(bad)).list.any()
    return pl.col("_line").cast(pl.Int64).is_in(bad)


class _FastReaderUnfit(ValueError):
    """The fast NDJSON reader cannot read this file exactly as the line-by-line one: use that one."""


def _unfit_if_any(flags: pl.Series) -> pl.Series:
    if flags.any():
        raise _FastReaderUnfit("a duplicated key or a lone surrogate escape")
    return flags


def _ndjson_shape(line: pl.Expr, bad_lines: list[int] | None) -> pl.Expr:
    return (pl.when(line.str.contains(r"^\s*$")).then(pl.lit(SHAPE_BLANK))
            .when(_bad_encoding(bad_lines)).then(pl.lit(SHAPE_BAD_ENCODING)))


def _scan_ndjson(path: Path, spec: ReadSpec, src: Path, bad_lines: list[int] | None,
                 fast: bool = True) -> RawInput:
    """NDJSON read line by line: a malformed line is one quarantined row.

    Ids must be JSON strings or integers: the first character of the value (found with a regex on the
    line, the key occurring once) tells an object, array, boolean or fraction apart from a string
    that merely looks like one, which the JSON path value alone cannot.

    ``fast``: every line is decoded once into a struct of text fields (``str.json_decode``; measured
    ~4x less CPU than one JSON-path lookup per field). It fails on a malformed line, an object or array
    value, a key given twice or a lone surrogate escape; the file is then read by the ``fallback``,
    which looks each field up on its own and quarantines such lines. Both give the same ids: an integer
    id is the JSON text of an integer that fits in 64 bits (a fraction, ``-0`` or a larger number is a
    bad id), and the other fields get the same values (a number in a text field aside: ``1E2`` reads as
    ``100`` here and ``100.0`` there).
    """
    sample = [s for s in _sample_lines(path, src) if s.strip()]
    if not sample:
        raise IngestError(f"{path}: empty input (no lines)")
    present = [c for c in {*spec.columns.values(), *spec.optional_columns.values()}
               if any(json.dumps(c) in s for s in sample)]
    _missing(path, spec, present)
    cols = {**spec.columns, **{f: c for f, c in spec.optional_columns.items() if c in present}}
    line = pl.col("line")
    lf = pl.scan_lines(src, row_index_name="_line").with_columns(pl.col("_line").cast(pl.Int64))
    id_fields = ((USER_ID, SHAPE_BAD_USER), (ITEM_ID, SHAPE_BAD_ITEM))
    # each sub-result is a column of its own so that it is computed once (polars would re-run an
    # expression at each of its uses)
    helpers = []
    for fld, _ in id_fields:
        k = re.escape(json.dumps(cols[fld]))
        # the value's first character (plus the rest of it when it is a number), and how often the key occurs
        helpers += [line.str.extract(rf"{k}\s*:\s*(\S[-+.0-9eE]*)", 1).alias(f"_tok_{fld}"),
                    line.str.count_matches(rf"{k}\s*:").alias(f"_keys_{fld}")]
    if fast:
        used = list(dict.fromkeys(cols.values()))
        text = pl.when(line.str.contains(r"^\s*$")).then(pl.lit("{}")).otherwise(line)
        lf = lf.with_columns(text.str.json_decode(pl.Struct({c: pl.String for c in used})).alias("_json"))
        ids = {cols[USER_ID], cols[ITEM_ID]}
        unfit = [line.str.count_matches(rf"{re.escape(json.dumps(c))}\s*:") > 1 for c in used if c not in ids]
        unfit.append(line.str.contains(r"\\u[dD][89a-fA-F]"))  # surrogate escapes: a lone one decodes wrongly
        helpers.append(pl.any_horizontal(unfit).map_batches(_unfit_if_any, return_dtype=pl.Boolean,
                                                            is_elementwise=True).alias("_unfit"))
        shape = (_ndjson_shape(line, bad_lines)
                 .when(pl.col("_json").is_null()).then(pl.lit(SHAPE_BAD_JSON))  # e.g. the line `null`
                 .when(pl.col("_unfit")).then(pl.lit(SHAPE_BAD_JSON)))
        values = {f: pl.col("_json").struct.field(c) for f, c in cols.items()}
    else:
        shape = _ndjson_shape(line, bad_lines).when(line.str.json_path_match("$").is_null()).then(
            pl.lit(SHAPE_BAD_JSON))
        values = {f: line.str.json_path_match(_json_path(c)) for f, c in cols.items()}
    lf = lf.with_columns(*helpers, *[v.alias(f) for f, v in values.items()])
    for fld, reason in id_fields:
        token, value = pl.col(f"_tok_{fld}"), pl.col(fld)
        first = token.str.head(1)
        number = first.str.contains(r"[-0-9]")
        if fast:  # the number as written: an integer within 64 bits (the fallback's JSON parser keeps those)
            integer = (token.str.contains(r"^-?(0|[1-9][0-9]*)$") & (token != "-0")
                       & (token.cast(pl.Int64, strict=False).is_not_null()
                          | token.cast(pl.UInt64, strict=False).is_not_null()))
        else:
            integer = value.str.contains(r"^-?\d+$")
        bad = (pl.col(f"_keys_{fld}") > 1) | first.is_in(["{", "[", "t", "f"]) | (number & ~integer)
        shape = shape.when(bad.fill_null(False)).then(pl.lit(reason))
    shape = shape.otherwise(pl.lit(None, dtype=pl.String))
    frame = lf.select(
        (pl.col("_line") + 1).alias("_row"),
        line.alias("_raw"),
        shape.alias("_shape"),
        *[pl.col(f) for f in values],
    )
    fallback = (lambda: _scan_ndjson(path, spec, src, bad_lines, fast=False)) if fast else None
    return RawInput(path, spec, frame, list(cols), _ends_with_newline(path),
                    rows_estimate=_rows_estimate(src, sample), fallback=fallback)


def _type_ok(fld: str, dtype: pl.DataType) -> bool:
    text = dtype in (pl.String, pl.Categorical) or isinstance(dtype, (pl.Categorical, pl.Enum))
    if fld in (USER_ID, ITEM_ID):
        return dtype.is_integer() or text
    if fld == TS:
        return dtype.is_numeric() or text or dtype == pl.Date or isinstance(dtype, pl.Datetime)
    if fld in (WATCH_SECONDS, TS_OFFSET_MS):
        return dtype.is_numeric() or text
    return text or dtype.is_integer()


def _scan_parquet(path: Path, spec: ReadSpec) -> RawInput:
    if path.is_dir():
        if not any(path.rglob("*.parquet")):
            raise IngestError(f"{path}: directory holds no *.parquet files")
        lf = pl.scan_parquet(str(path / "**" / "*.parquet"), hive_partitioning=True, row_index_name="_row",
                             row_index_offset=1)
    else:  # the scan's own row index: a head() (the type sample) then reads a few rows, not the file
        lf = pl.scan_parquet(path, row_index_name="_row", row_index_offset=1)
    try:
        schema = lf.collect_schema()
        rows = int(lf.select(pl.len()).collect().item())  # from the footers
    except Exception as exc:
        raise IngestError(f"{path}: cannot read as Parquet: {clip(exc)}") from exc
    names = [n for n in schema.names() if n != "_row"]
    _missing(path, spec, names)
    cols = {**spec.columns, **{f: c for f, c in spec.optional_columns.items() if c in names}}
    for fld, col in cols.items():
        if not _type_ok(fld, schema[col]):
            what = "integers or strings" if fld in (USER_ID, ITEM_ID) else "numbers, strings or datetimes"
            raise IngestError(f"{path}: column {col!r} ({fld}) has type {schema[col]}; it must hold {what}")
    used = list(dict.fromkeys(cols.values()))
    indexed = lf.with_columns(pl.col("_row").cast(pl.Int64))
    frame = indexed.select(
        pl.col("_row"),
        pl.lit(None, dtype=pl.String).alias("_raw"),
        pl.lit(None, dtype=pl.String).alias("_shape"),
        *[(pl.col(c).cast(pl.String) if isinstance(schema[c], (pl.Categorical, pl.Enum)) else pl.col(c))
          .alias(f) for f, c in cols.items()],
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
        return scan(path, spec, path, None)
    except _NotUtf8:
        dest = work / "utf8" / f"{len(list(work.glob('utf8/*')))}-{path.name}.txt"
        copy, bad = lossy_utf8_copy(path, dest)
        return scan(path, spec, copy, bad)
