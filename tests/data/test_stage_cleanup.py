"""kill -9 of sessions / split (issue 12, row 11): the temp folder a killed run leaves is removed by the
next run of the stage, whoever left it; a live run's folder is left alone. Lineage: the events version."""

from __future__ import annotations

import os
import subprocess
import sys

from ingest_helpers import REPO, make_config, run, write

from recsys.data.atomic_dir import clean_stale
from recsys.data.sessions import build_sessions
from recsys.data.split import split_sessions

T0 = 1_767_268_800

KILLED = """
import os, sys
from pathlib import Path
from recsys.data.atomic_dir import fresh_tmp_dir
tmp = fresh_tmp_dir(Path({out!r}))
(tmp / "part-0000.parquet").write_bytes(b"x" * 100_000)  # half-written output
os.kill(os.getpid(), 9)
"""


def _killed_run(out) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLED.format(out=str(out))], cwd=REPO, capture_output=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -9, proc.stderr.decode()


def test_next_sessions_and_split_runs_remove_what_killed_runs_left(tmp_path):
    root = tmp_path / "data"
    rows = "".join(f"u{u},{i},{T0 + 60 * (3 * u + i)}\n" for u in range(30) for i in range(3))
    run([write(tmp_path / "log.csv", "user_id,item_id,ts\n" + rows)], root)
    config = make_config(root)
    config.sessions.min_item_support = 1
    for out in (config.paths.sessions_dir, config.paths.split_dir):
        _killed_run(out)
        assert len(list(out.parent.glob(f".{out.name}.tmp-*"))) == 1
    build_sessions(config)
    split_sessions(config)
    left = [p.name for p in root.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert left == []
    assert (config.paths.split_dir / "train.parquet").is_file()
    # lineage: the split knows which events table version it came from, and training runs tag it
    from recsys.tracking.lineage import lineage_tags

    run([write(tmp_path / "late.csv", f"user_id,item_id,ts\nlate,1,{T0}\n")], root)  # version 1
    assert lineage_tags(config.paths.split_dir, config.paths.events_dir)["data.events_version"] == "0"


def test_a_live_runs_folder_is_kept_and_an_interrupted_swap_is_restored(tmp_path):
    out = tmp_path / "sessions"
    live = tmp_path / f".sessions.tmp-{os.getppid()}"  # the parent process: alive
    live.mkdir()
    old = tmp_path / ".sessions.old-999999999"  # killed between the two renames of a swap
    old.mkdir()
    (old / "part-0000.parquet").write_bytes(b"previous output")
    clean_stale(out)
    assert live.is_dir()
    assert (out / "part-0000.parquet").read_bytes() == b"previous output"
