"""Two publications of the same run date at once (two `recsys score` runs): both succeed, the export stays
complete. Before the per-date lock, one run's recovery deleted the other's live staging folder and the
loser failed with a bare ``[Errno 2] ... _staging/...tmp-...``."""

from __future__ import annotations

import threading
from datetime import date

import polars as pl

from recsys.schemas import ITEM_ID, RANK, SCORE, USER_ID
from recsys.serving.export import RecsChecks, is_complete, partition_dir, publish_recs, read_recs

DAY = date(2026, 3, 10)


def recs_frame(version: str, users: int = 400, k: int = 5) -> pl.DataFrame:
    rows = [(u, r, 1000 + u * 10 + r, float(k - r), "model", "m", version, DAY)
            for u in range(users) for r in range(1, k + 1)]
    return pl.DataFrame(rows, orient="row", schema={
        USER_ID: pl.Int64, RANK: pl.Int16, ITEM_ID: pl.Int64, SCORE: pl.Float32, "source": pl.String,
        "model_name": pl.String, "model_version": pl.String, "run_date": pl.Date,
    })


def test_two_publications_of_one_date_at_once_both_succeed(tmp_path):
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def run(version: str) -> None:
        frame = recs_frame(version)
        start.wait()
        for _ in range(15):
            try:
                publish_recs(frame, exports_dir=tmp_path, run_date=DAY, checks=RecsChecks(top_k=5),
                             manifest={"model": {"version": version}}, write_csv=True)
            except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

    threads = [threading.Thread(target=run, args=(v,)) for v in ("1", "2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert is_complete(partition_dir(tmp_path, DAY))
    assert read_recs(tmp_path, DAY).collect()["model_version"].n_unique() == 1
    assert not list((tmp_path / "_staging").iterdir())
