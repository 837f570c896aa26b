"""Constants shared by the flow tests (tiny, fast settings)."""

from __future__ import annotations

from datetime import date

RUN_DATE = date(2026, 4, 2)  # the day after the synthetic period: every event is history
TINY = [
    "generate.n_events=4000",
    "train.epochs=1",
    "train.batch_size=16",
    "train.n_sample=32",
    "model.hidden_size=16",
    "tracking.system_metrics=false",
    "evaluate.knn_neighbours=20",
    "orchestrate.io_retry_delay_seconds=0",
]
