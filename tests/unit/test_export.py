"""Export validation and the atomic publish: every failed check publishes nothing; a crash (simulated at
every step, with and without the atomic exchange) leaves the previous or the new complete partition
visible; the next run cleans up."""

from __future__ import annotations

import json
from datetime import date

import polars as pl
import pytest

from recsys.schemas import ITEM_ID, MANIFEST_FILE, RANK, SCORE, USER_ID
from recsys.serving import export
from recsys.serving.export import (
    ExportValidationError,
    RecsChecks,
    complete_partitions,
    partition_dir,
    publish_recs,
    read_recs,
    recover,
    snapshot_hash,
    validate_recs,
)

DAY = date(2026, 3, 10)


def recs_frame(users=(1, 2, 3), k=3, version="1", first_item=10) -> pl.DataFrame:
    rows = [(u, r, first_item + u * 10 + r, float(k - r), "model", "m", version, DAY)
            for u in users for r in range(1, k + 1)]
    return pl.DataFrame(rows, orient="row", schema={
        USER_ID: pl.Int64, RANK: pl.Int16, ITEM_ID: pl.Int64, SCORE: pl.Float32, "source": pl.String,
        "model_name": pl.String, "model_version": pl.String, "run_date": pl.Date,
    })


def publish(tmp_path, recs, checks=None, **kw):
    return publish_recs(recs, exports_dir=tmp_path, run_date=DAY, manifest={"model": {"version": "x"}},
                        checks=checks or RecsChecks(top_k=3), **kw)


def visible(tmp_path) -> str | None:
    """Model version a reader sees for DAY (None: nothing complete)."""
    try:
        return read_recs(tmp_path, DAY).collect()["model_version"].unique().item()
    except FileNotFoundError:
        return None


def test_valid_frame_passes_and_publishes_manifest_last(tmp_path):
    result = publish(tmp_path, recs_frame())
    part = partition_dir(tmp_path, DAY)
    assert result.path == part and sorted(p.name for p in part.iterdir()) == [MANIFEST_FILE, "part-0.parquet"]
    manifest = json.loads((part / MANIFEST_FILE).read_text())
    assert manifest["rows"] == 9 and manifest["files"] == ["part-0.parquet"] and "created_at" in manifest
    assert read_recs(tmp_path).collect().height == 9


def _gap(f):  # user 1 ranks 1, 3, 4
    return f.with_columns(pl.when((pl.col(USER_ID) == 1) & (pl.col(RANK) > 1)).then(pl.col(RANK) + 1)
                          .otherwise(pl.col(RANK)).alias(RANK))


CASES = {
    "rank gap": (_gap, {}, "not contiguous"),
    "rank not from 1": (lambda f: f.with_columns(pl.col(RANK) + 1), {}, "not contiguous"),
    "duplicate item": (lambda f: f.with_columns(pl.lit(5, pl.Int64).alias(ITEM_ID)), {}, "not unique"),
    "too many ranks": (lambda f: f, {"top_k": 2}, "more than top_k"),
    "excluded item": (lambda f: f, {"excluded_items": pl.Series(["21"])}, "excluded item"),
    "missing user": (lambda f: f, {"requested_users": pl.Series([1, 2, 3, 4])}, "requested users"),
    "seen item": (lambda f: f, {"seen": pl.DataFrame({USER_ID: [2], ITEM_ID: [32]})}, "already watched"),
    "masked score": (lambda f: f.with_columns(pl.lit(-float("inf"), pl.Float32).alias(SCORE)), {}, "finite"),
    "bad source": (lambda f: f.with_columns(pl.lit("random").alias("source")), {}, "source"),
    "wrong rank type": (lambda f: f.with_columns(pl.col(RANK).cast(pl.Int64)), {}, "rank has type"),
    "null item": (lambda f: f.with_columns(pl.lit(None, pl.Int64).alias(ITEM_ID)), {}, "null"),
    "missing column": (lambda f: f.drop("source"), {}, "missing columns"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_validation_failure_publishes_nothing(tmp_path, case):
    change, check_kw, message = CASES[case]
    checks = RecsChecks(**{"top_k": 3, **check_kw})
    assert validate_recs(recs_frame(), RecsChecks(top_k=3)) == []
    with pytest.raises(ExportValidationError, match=message):
        publish(tmp_path, change(recs_frame()), checks)
    assert not partition_dir(tmp_path, DAY).exists()
    assert not (tmp_path / "_staging").exists() or not list((tmp_path / "_staging").iterdir())


def test_failed_validation_keeps_the_previous_export(tmp_path):
    publish(tmp_path, recs_frame(version="old"))
    with pytest.raises(ExportValidationError):
        publish(tmp_path, _gap(recs_frame(version="new")))
    assert visible(tmp_path) == "old"


class Crash(BaseException):
    """Stands for kill -9: not an Exception, so nothing in publish cleans up after it."""


PHASES = [
    (True, "staged"), (True, "manifest"), (True, "exchanged"),
    (False, "staged"), (False, "manifest"), (False, "renamed_away"), (False, "renamed_in"),
]


@pytest.mark.parametrize("exchange, phase", PHASES)
def test_crash_leaves_old_or_new_complete_and_rerun_cleans_up(tmp_path, monkeypatch, exchange, phase):
    publish(tmp_path, recs_frame(version="old"), exchange=exchange)

    def crash_at(name):
        if name == phase:
            raise Crash(name)

    monkeypatch.setattr(export, "_crash_point", crash_at)
    with pytest.raises(Crash):
        publish(tmp_path, recs_frame(version="new", users=(1, 2, 3, 4)), exchange=exchange)
    monkeypatch.undo()

    seen = visible(tmp_path)
    if phase == "renamed_away":  # only in the portable fallback: the old partition sits in staging
        assert seen is None and not partition_dir(tmp_path, DAY).exists()
        assert any(".old-" in p.name for p in (tmp_path / "_staging").iterdir())
        assert recover(tmp_path, "recs", DAY)[0].startswith("restored")
        seen = visible(tmp_path)
    expected = "new" if phase in ("exchanged", "renamed_in") else "old"
    assert seen == expected
    # whatever is visible is whole: its manifest row count matches its data
    part = partition_dir(tmp_path, DAY)
    rows = pl.read_parquet(part / "part-0.parquet").height
    assert json.loads((part / MANIFEST_FILE).read_text())["rows"] == rows

    publish(tmp_path, recs_frame(version="rerun"), exchange=exchange)
    assert visible(tmp_path) == "rerun"
    assert list((tmp_path / "_staging").iterdir()) == []


def test_crash_on_first_publish_leaves_nothing_visible(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "_crash_point", lambda name: (_ for _ in ()).throw(Crash(name)))
    with pytest.raises(Crash):
        publish(tmp_path, recs_frame())
    monkeypatch.undo()
    assert visible(tmp_path) is None and not partition_dir(tmp_path, DAY).exists()
    publish(tmp_path, recs_frame(version="2"))
    assert visible(tmp_path) == "2"


def test_readers_skip_a_partition_without_manifest(tmp_path):
    publish(tmp_path, recs_frame())
    half = partition_dir(tmp_path, date(2026, 3, 11))
    half.mkdir(parents=True)
    recs_frame().write_parquet(half / "part-0.parquet")  # e.g. copied by hand, no manifest
    assert complete_partitions(tmp_path) == [partition_dir(tmp_path, DAY)]
    with pytest.raises(FileNotFoundError):
        read_recs(tmp_path, date(2026, 3, 11))


def test_exports_for_other_dates_are_untouched(tmp_path):
    publish(tmp_path, recs_frame(version="a"))
    other = publish_recs(recs_frame(), exports_dir=tmp_path, run_date=date(2026, 3, 11), manifest={},
                         checks=RecsChecks(top_k=3))
    assert other.path.exists() and visible(tmp_path) == "a"
    assert len(complete_partitions(tmp_path)) == 2


def test_snapshot_hash_follows_inputs(tmp_path):
    f = tmp_path / "a.parquet"
    f.write_bytes(b"1")
    users = tmp_path / "users.txt"
    users.write_text("1\n")
    h1 = snapshot_hash([f], [users])
    assert h1 == snapshot_hash([f], [users])
    users.write_text("2\n")
    assert snapshot_hash([f], [users]) != h1
    f.write_bytes(b"12")
    assert snapshot_hash([f]) != snapshot_hash([tmp_path / "a.parquet"], [users])


def test_variants_written_and_retired_with_the_run(tmp_path):
    publish(tmp_path, recs_frame(version="a"), write_csv=True, write_wide=True)
    wide = pl.read_parquet(partition_dir(tmp_path, DAY, "recs_wide") / "part-0.parquet")
    assert wide.height == 3 and wide["item_ids"].to_list()[0] == [21, 22, 23]
    assert pl.read_csv(partition_dir(tmp_path, DAY, "recs_csv") / "recs.csv").height == 9
    publish(tmp_path, recs_frame(version="b"))  # no variants this time: the old ones must not linger
    assert not partition_dir(tmp_path, DAY, "recs_wide").exists()
    assert not partition_dir(tmp_path, DAY, "recs_csv").exists()
    assert visible(tmp_path) == "b" and list((tmp_path / "_staging").iterdir()) == []


def test_rows_in_any_order_are_validated_the_same(tmp_path):
    shuffled = recs_frame().sample(fraction=1.0, shuffle=True, seed=3)
    assert validate_recs(shuffled, RecsChecks(top_k=3)) == []
    assert "not unique" in validate_recs(
        shuffled.with_columns(pl.lit(5, pl.Int64).alias(ITEM_ID)), RecsChecks(top_k=3))[0]


CHILD = '''
import sys, numpy as np, polars as pl
from datetime import date
from recsys.serving.export import publish_recs, RecsChecks
n, k = 100_000, 20
recs = pl.DataFrame({
    "user_id": np.repeat(np.arange(n), k), "rank": np.tile(np.arange(1, k + 1, dtype=np.int16), n),
    "item_id": np.tile(np.arange(k), n), "score": np.ones(n * k, dtype=np.float32),
}).with_columns(source=pl.lit("model"), model_name=pl.lit("m"), model_version=pl.lit(sys.argv[2]),
                run_date=pl.lit(date(2026, 3, 10)))
print("ready", flush=True)
publish_recs(recs, exports_dir=sys.argv[1], run_date=date(2026, 3, 10), manifest={},
             checks=RecsChecks(top_k=k), write_csv=True)
'''


@pytest.mark.slow
def test_real_kill_9_at_random_moments(tmp_path):
    """A real SIGKILL while a 2M-row export is published: whatever is visible is complete."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "child.py"
    script.write_text(CHILD)
    subprocess.run([sys.executable, str(script), str(tmp_path), "v0"], check=True, capture_output=True)
    rng = random.Random(5)
    seen_versions = set()
    for i in range(1, 7):
        child = subprocess.Popen([sys.executable, str(script), str(tmp_path), f"v{i}"],
                                 stdout=subprocess.PIPE, text=True)
        child.stdout.readline()  # the frame is built; publishing starts now
        time.sleep(rng.uniform(0, 1.0))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        part = partition_dir(tmp_path, DAY)
        data = pl.read_parquet(part / "part-0.parquet")
        assert json.loads((part / MANIFEST_FILE).read_text())["rows"] == data.height == 2_000_000
        seen_versions.add(data["model_version"].unique().item())
    assert seen_versions <= {f"v{i}" for i in range(7)}
    subprocess.run([sys.executable, str(script), str(tmp_path), "last"], check=True, capture_output=True)
    assert visible(tmp_path) == "last" and list((tmp_path / "_staging").iterdir()) == []
