"""Two runs on one data root take turns (issue 14 #3): the second waits for the first instead of failing
with "another training is writing ...checkpoints/gru4rec"; the pipeline's own train subflow re-enters."""

from __future__ import annotations

import threading
import time

from flows._common import data_root_slot
from recsys.config import load_config


def test_second_run_waits_for_the_first_and_a_subflow_reenters(tmp_path, caplog):
    config = load_config(None, [f"paths.data_root={tmp_path}"])
    spans: dict[str, tuple[float, float]] = {}
    first_in = threading.Event()

    def run(name: str, hold: float) -> None:
        with data_root_slot(config, name, poll_seconds=0.05):
            start = time.monotonic()
            first_in.set()
            with data_root_slot(config, f"{name} train subflow"):  # same call tree: no deadlock
                time.sleep(hold)
            spans[name] = (start, time.monotonic())

    first = threading.Thread(target=run, args=("pipeline 2026-04-03", 0.5))
    first.start()
    first_in.wait(10)
    with caplog.at_level("INFO"):
        run("pipeline 2026-04-04", 0.0)
    first.join()
    assert spans["pipeline 2026-04-04"][0] >= spans["pipeline 2026-04-03"][1]
    assert "waits for the data root" in caplog.text and "pipeline 2026-04-03" in caplog.text
