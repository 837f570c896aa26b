"""The directories the documentation's code blocks run in: a reader's checkout, shrunk to test size.

Layout, as in this repository's development setup::

    <base>/repo/               the working directory: conf/ (tiny settings), data/, sample input files
    <base>/shared/data/        tiny MovieLens-format files where the real ones live (../shared/data)

Workspaces a page can start from (``<!-- docs-test: workspace=NAME -->``):

- ``inputs``: the sample files only (synthetic logs in data/raw/synthetic, MovieLens/YOOCHOOSE/DIGINETICA
  and custom-format files), nothing ingested yet;
- ``trained``: what a reader has after following docs/getting-started.md: ``inputs`` + that page's
  blocks run in order (ingest -> sessions -> split of the synthetic logs, a model trained, registered
  and promoted to @champion in the embedded MLflow store, an export for 2026-03-31). Building it *is*
  that page's test, so a broken getting-started block fails with its own report.

Every file is generated here (no network, no real user data); conf/ is the repository's conf/ with
small sizes so that a plain ``recsys train`` takes seconds. Explicit ``--set`` in a block still wins.
"""

from __future__ import annotations

import gzip
import shutil
import sys
from pathlib import Path

import polars as pl
import yaml
from snippets import failure_report, parse_page, run_snippet

from recsys.config import load_config
from recsys.data.synthetic import generate

REPO = Path(__file__).resolve().parents[2]
WORKSPACES = ("inputs", "trained")
BUILDER_PAGE = REPO / "docs" / "getting-started.md"  # its blocks turn ``inputs`` into ``trained``

# conf/<section>.yaml keys replaced in the workspace copy: the pipeline's shape, at test size.
TINY: dict[str, dict[str, object]] = {
    "generate": {"n_events": 4000},
    "train": {"epochs": 1, "batch_size": 16, "n_sample": 32},
    "model": {"hidden_size": 16},
    "tracking": {"system_metrics": False, "retry_window_seconds": 0},
    "evaluate": {"knn_neighbours": 20},
    "orchestrate": {"io_retry_delay_seconds": 0},
    "tune": {"n_trials": 2, "epochs": 1, "prune_after_trials": 1},
}


def write_tiny_conf(dest: Path) -> None:
    """Copy conf/ (profiles included) with the TINY sizes applied to the section files."""
    shutil.copytree(REPO / "conf", dest)
    for section, values in TINY.items():
        file = dest / f"{section}.yaml"
        tree = yaml.safe_load(file.read_text()) or {}
        tree.update(values)
        file.write_text(yaml.safe_dump(tree, sort_keys=False))


def _ratings(events: pl.DataFrame) -> pl.DataFrame:
    """MovieLens-style ratings (user, item, rating, unix seconds) from generated viewing events."""
    return (events.drop_nulls(["user_id", "item_id", "ts"])
            .with_columns(pl.col("ts").str.to_datetime(time_zone="UTC", strict=False))
            .drop_nulls("ts").filter(pl.col("ts").dt.year() == 2026)
            .unique(["user_id", "item_id"], keep="first", maintain_order=True)
            .select(pl.col("user_id"), pl.col("item_id"), pl.lit(4).alias("rating"),
                    pl.col("ts").dt.epoch("s").alias("timestamp")))


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text.encode(), mtime=0) if path.suffix == ".gz" else text.encode())


def _day_log(pairs: list[tuple], day: str, second: int) -> str:
    """A CSV of one day's events in the contract's columns, one distinct time per row."""
    return "user_id,item_id,ts\n" + "".join(f"{u},{i},{day}T{n // 60:02}:{n % 60:02}:{second:02}Z\n"
                                             for n, (u, i) in enumerate(pairs))


def _movielens_items(titles: pl.DataFrame) -> tuple[bytes, str]:
    """MovieLens item files for the generated titles: ml-100k ``u.item`` (latin-1, ``|``, genre flags)
    and ml-latest-small ``movies.csv`` (quoted titles, ``|``-joined genres)."""
    genres = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
              "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
              "Thriller", "War", "Western"]
    u_item, movies = [], ["movieId,title,genres"]
    for item, title, genre in titles.iter_rows():
        name = (genre or "unknown").capitalize()
        flags = "|".join("1" if g == name else "0" for g in genres)
        u_item.append(f"{item}|{title} (2026)|01-Jan-2026||http://example.invalid/{item}|{flags}\n")
        movies.append(f'{item},"{title} (2026)",{name if name in genres else "(no genres listed)"}')
    return "".join(u_item).encode("latin-1", errors="replace"), "\n".join(movies) + "\n"


def write_sample_inputs(repo: Path, shared: Path) -> None:
    """Synthetic logs plus one small file in every input format the documentation ingests."""
    config = load_config(repo / "conf", values={"paths": {"data_root": str(repo / "data")}})
    generate(config)
    events = pl.concat([pl.read_parquet(f) for f in sorted((repo / "data/raw/synthetic").glob("part-*"))])
    ratings = _ratings(events)
    rows = list(ratings.iter_rows())
    u_data = "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows)
    titles = pl.read_parquet(repo / "data/raw/synthetic/catalogue.parquet",
                             columns=["item_id", "title", "genre"])
    u_item, movies = _movielens_items(titles)
    for root in (repo, shared):
        _write_text(root / "ml-100k/u.data", u_data)
        (root / "ml-100k/u.item").write_bytes(u_item)
        csv_rows = "".join(f"{u},{i},{r}.0,{t}\n" for u, i, r, t in rows)
        _write_text(root / "ml-latest-small/ratings.csv", "userId,movieId,rating,timestamp\n" + csv_rows)
        _write_text(root / "ml-latest-small/movies.csv", movies)
    _write_text(repo / "ml-1m/ratings.dat", "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows))
    clean = events.drop_nulls(["user_id", "item_id", "ts"]).head(500)
    _write_text(repo / "yoochoose-clicks.dat", "".join(
        f"{u},{t},{i},0\n" for u, i, t in clean.select("user_id", "item_id", "ts").iter_rows()))
    _write_text(repo / "train-item-views.csv", "sessionId;userId;itemId;timeframe;eventdate\n" + "".join(
        f"{u};NA;{i};{(n * 7919) % 86_400_000};{t[:10]}\n"
        for n, (u, i, t) in enumerate(clean.select("user_id", "item_id", "ts").iter_rows())))
    bad = ",100001,2026-03-01T20:15:00Z,60\nacc-1,100001,yesterday,60\n"  # null user, unparseable ts
    _write_text(repo / "logs/2026-03-01.csv.gz", "account,title_id,started_at,seconds_watched\n" + "".join(
        f"acc-{u},{i},{t},{w or 0}\n" for u, i, t, w in
        clean.select("user_id", "item_id", "ts", "watch_seconds").iter_rows()) + bad)
    _write_text(repo / "export.txt", "".join(
        f"{u}|{i}|{t}\n" for u, i, t in clean.select("user_id", "item_id", "ts").iter_rows()))
    pairs = list(clean.select("user_id", "item_id").iter_rows())  # docs/ingest-guarantees.md: late data
    _write_text(repo / "day-2026-01-01.csv", _day_log(pairs[:100], "2026-01-01", 0))
    late_user, late_item = pairs[150]  # one event of 01-01 that arrives with the next day's log
    _write_text(repo / "day-2026-01-02.csv", _day_log(pairs[100:150], "2026-01-02", 0)
                + f"{late_user},{late_item},2026-01-01T23:59:00Z\n")
    _write_text(repo / "corrected-2026-01-01.csv", _day_log(pairs[:100], "2026-01-01", 30))
    users = events.drop_nulls("user_id")["user_id"].unique().sort().head(3)
    pl.DataFrame({"user_id": users}).write_parquet(repo / "users.parquet")
    _write_text(repo / "withdrawn.txt", "".join(f"{i}\n" for i in clean["item_id"].unique().sort().head(2)))


def write_activate(venv_bin: Path, env: dict[str, str]) -> None:
    """A ``.venv/bin/activate`` for ``source .venv/bin/activate`` blocks: the tests' PATH (this checkout's
    ``recsys``, then the test venv's tools), as the real script sets up after ``make``."""
    venv_bin.mkdir(parents=True)
    (venv_bin / "activate").write_text(f"export VIRTUAL_ENV='{sys.prefix}'\nexport PATH='{env['PATH']}'\n")
    (venv_bin / "python").symlink_to(sys.executable)


class WorkspaceError(RuntimeError):
    """A block of the builder page failed; the message is that block's failure report."""


def build(base: Path, name: str, env: dict[str, str], inputs: Path | None = None,
          timeout: float = 300) -> Path:
    """Create workspace ``name`` under ``base`` (``trained`` starts from a copy of ``inputs``)."""
    if name not in WORKSPACES:
        raise ValueError(f"unknown workspace {name!r} (known: {', '.join(WORKSPACES)})")
    if name == "inputs":
        repo = base / "repo"
        write_tiny_conf(repo / "conf")
        shutil.copytree(REPO / "docker", repo / "docker", ignore=shutil.ignore_patterns(".env"))
        write_activate(repo / ".venv" / "bin", env)
        write_sample_inputs(repo, base / "shared" / "data")
        return repo
    assert inputs is not None
    shutil.copytree(inputs.parent, base, dirs_exist_ok=True, symlinks=True)
    repo = base / inputs.name
    scripts = base / "scripts"
    scripts.mkdir()
    for block in parse_page(BUILDER_PAGE).snippets:
        if block.executed and not block.slow:
            result = run_snippet(block, repo, env, timeout, scripts)
            if result.returncode:
                raise WorkspaceError(f"building workspace {name!r}: " + failure_report(block, result))
    return repo


def copy_for_page(workspace: Path, dest_base: Path) -> Path:
    """A private copy of a workspace for one page: blocks may change files without touching others.

    MLflow keeps absolute artifact locations in its SQLite store, so artifacts of a copied store still
    resolve inside the original workspace (kept for the whole session); new artifacts land there too.
    """
    shutil.copytree(workspace.parent, dest_base, dirs_exist_ok=True, symlinks=True)
    return dest_base / workspace.name
