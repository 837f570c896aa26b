"""Item vocabulary: original item id <-> contiguous index, built from the training split only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from recsys.schemas import COUNT, IDX, ITEM_ID, VOCAB_IDX_DTYPE


@dataclass(frozen=True)
class Vocab:
    """Frame with one row per item: ``item_id`` (original), ``idx`` (0..n-1), ``count`` (train events)."""

    frame: pl.DataFrame

    @classmethod
    def from_items(cls, items: pl.Series) -> Vocab:
        """Build from a column of (training) item ids; index order is by descending count, then id."""
        counts = (
            items.rename(ITEM_ID).to_frame().group_by(ITEM_ID).len(name=COUNT)
            .with_columns(pl.col(COUNT).cast(pl.Int64))
            .sort([COUNT, ITEM_ID], descending=[True, False])
        )
        frame = counts.with_row_index(IDX).with_columns(pl.col(IDX).cast(VOCAB_IDX_DTYPE))
        return cls(frame.select(ITEM_ID, IDX, COUNT))

    @classmethod
    def load(cls, path: Path) -> Vocab:
        return cls(pl.read_parquet(path).sort(IDX))

    def save(self, path: Path) -> None:
        self.frame.write_parquet(path)

    def __len__(self) -> int:
        return self.frame.height

    @property
    def item_ids(self) -> pl.Series:
        """Original ids in index order: ``item_ids[idx]`` is the id of index ``idx``."""
        return self.frame[ITEM_ID]

    @property
    def counts(self) -> np.ndarray:
        """Training event count per index, int64 [n_items]."""
        return self.frame[COUNT].to_numpy()

    def index_of(self, item_ids: pl.Series) -> np.ndarray:
        """Indices for a column of original ids, -1 where the id is not in the vocabulary (int64)."""
        if item_ids.dtype != self.frame[ITEM_ID].dtype:
            item_ids = item_ids.cast(self.frame[ITEM_ID].dtype, strict=False)
        looked_up = item_ids.rename(ITEM_ID).to_frame().join(
            self.frame.select(ITEM_ID, IDX), on=ITEM_ID, how="left", maintain_order="left"
        )
        return looked_up[IDX].fill_null(-1).cast(pl.Int64).to_numpy()
