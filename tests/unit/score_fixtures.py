"""Tiny scoring world shared by test_score.py and test_export.py: events, a vocabulary, a random GRU4Rec
checkpoint written with the real ``save_checkpoint``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import polars as pl
import torch

from recsys.config import Config
from recsys.data.vocab import Vocab
from recsys.model.checkpoint import save_checkpoint
from recsys.model.gru4rec import GRU4Rec
from recsys.model.policy import Policy
from recsys.schemas import ITEM_ID, TS, USER_ID

RUN_DATE = date(2026, 3, 10)
KNOWN_ITEMS = list(range(100, 130))  # in the vocabulary; counts decrease with the id
UNKNOWN_ITEMS = [900, 901]  # watched, but unknown to the model


@dataclass
class World:
    config: Config
    checkpoint: Path
    events_dir: Path
    exports_dir: Path
    vocab: Vocab
    model: GRU4Rec


def make_events() -> pl.DataFrame:
    """User 1..6 histories (time-ordered as listed); some edge cases on purpose.

    1: a normal history; 2: a long one (truncated by max_history); 3: only unknown items (-> popular);
    4: known items mixed with unknown ones and a consecutive repeat; 5: one event after the run date (ignored)
    plus an old one; 6: only events after the run date (-> not a user on that date); 7: one old event of
    the most popular item (outside a short history window -> popular list without that item).
    """
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    rows: list[tuple[int, int, datetime]] = []

    def add(user: int, items: list[int], start: datetime) -> None:
        rows.extend((user, item, start + timedelta(minutes=10 * i)) for i, item in enumerate(items))

    add(1, [100, 103, 107, 101], t0)
    add(2, [110 + (i % 15) for i in range(40)], t0)
    add(3, UNKNOWN_ITEMS, t0)
    add(4, [105, 900, 105, 106, 106, 112], t0)
    add(5, [120], t0 - timedelta(days=30))
    add(5, [121], t0 + timedelta(days=20))
    add(6, [122, 123], datetime(2026, 3, 15, tzinfo=UTC))
    add(7, [100], t0 - timedelta(days=40))
    return pl.DataFrame(rows, schema={USER_ID: pl.Int64, ITEM_ID: pl.Int64, TS: pl.Datetime("us", "UTC")},
                        orient="row")


def write_events(events: pl.DataFrame, events_dir: Path) -> None:
    """Hive-partitioned by event date, like the ingest stage writes them."""
    for (day,), part in events.with_columns(d=pl.col(TS).dt.date()).partition_by("d", as_dict=True).items():
        folder = events_dir / f"event_date={day.isoformat()}"
        folder.mkdir(parents=True, exist_ok=True)
        part.drop("d").write_parquet(folder / "part-0.parquet")


def make_vocab() -> Vocab:
    counts = {item: 40 - i for i, item in enumerate(KNOWN_ITEMS)}  # 100 most popular
    items = pl.Series(ITEM_ID, [item for item, c in counts.items() for _ in range(c)], dtype=pl.Int64)
    return Vocab.from_items(items)


def make_world(
    tmp_path: Path,
    score: dict | None = None,
    hidden: int = 8,
    seed: int = 0,
    history_bias: float | None = None,
    exclude: str = "all",
) -> World:
    """``history_bias``: the model has a learned repeat offset, set to this value. ``exclude``: the
    recommendation policy stored in the checkpoint (every watched item excluded by default)."""
    data_root = tmp_path / "data"
    config = Config.model_validate({
        "paths": {"data_root": str(data_root)},
        "model": {"hidden_size": hidden, "history_bias": history_bias is not None},
        "score": {"top_k": 5, "max_history": 10, "device": "cpu", **(score or {})},
    })
    vocab = make_vocab()
    torch.manual_seed(seed)
    model = GRU4Rec(len(vocab), config.model).eval()
    if history_bias is not None:
        model.history_bias.data.fill_(history_bias)
    checkpoint = save_checkpoint(
        data_root / "checkpoints" / "tiny.pt", model=model, optimizer=None, config=config, vocab=vocab,
        epoch=0, metrics={}, policy=Policy(exclude=exclude),
    )
    write_events(make_events(), config.paths.events_dir)
    return World(config, Path(checkpoint), config.paths.events_dir, config.paths.exports_dir, vocab, model)
