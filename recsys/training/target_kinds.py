"""What kind of watch a next-watch target is, given the viewer's history and the item catalogue.

Why: a new item's hit rate mixes targets of very different difficulty. The next episode of a series the
viewer follows is predictable from the catalogue alone (the continuation rule of recsys.model.policy),
the first episode of a series nobody in the history points to is not, and a new film only through taste
and early popularity. Splitting the hit rate by kind says which part a model or rule moved.

Kinds (:data:`KINDS`):

- ``next-episode``: the episode after the latest watched episode of its series (catalogue order: series,
  season, episode) in the viewer's history;
- ``other-episode``: an episode of a series in the history, but not that one (a skip, a re-watch);
- ``series-start``: an episode of a series the history does not contain;
- ``film``: a catalogue item that is not an episode;
- ``unknown``: not in the catalogue (or no catalogue).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from recsys.data.catalogue import episode_order
from recsys.schemas import ITEM_ID

KINDS = ("next-episode", "other-episode", "series-start", "film", "unknown")


def next_episodes(catalogue: pl.DataFrame) -> pl.DataFrame:
    """``(item_id, series_id, next_id)`` of every episode; ``next_id`` null after a series' last one."""
    return (catalogue.filter(pl.col("series_id").is_not_null())
            .sort(episode_order(catalogue.columns), nulls_last=True)
            .select(ITEM_ID, "series_id",
                    pl.col(ITEM_ID).shift(-1).over("series_id").alias("next_id")))


def target_kinds(histories: pl.Series, targets: pl.Series, catalogue: pl.DataFrame | None) -> np.ndarray:
    """The kind (index into :data:`KINDS`) of each target [n], given each target's time-ordered history.

    ``histories`` is a list column of item ids (oldest first), ``targets`` the item ids, row by row.
    Only the history decides: nothing after the target's time is used.
    """
    n = len(targets)
    out = np.full(n, KINDS.index("unknown"), dtype=np.int64)
    if catalogue is None or n == 0 or not {"series_id", "episode"} <= set(catalogue.columns):
        if catalogue is not None and n:
            ids = targets.cast(catalogue[ITEM_ID].dtype, strict=False)
            is_known = ids.is_in(catalogue[ITEM_ID].implode())
            out[is_known.fill_null(False).to_numpy()] = KINDS.index("film")
        return out
    id_type = catalogue[ITEM_ID].dtype
    episodes = next_episodes(catalogue)
    hist = (pl.DataFrame({"_row": np.arange(n), "_item": histories})
            .explode("_item")
            .with_columns(pl.col("_item").cast(id_type, strict=False), pl.int_range(pl.len()).alias("_pos"))
            .join(episodes.rename({ITEM_ID: "_item"}), on="_item", how="inner"))
    # the latest watched episode of each (row, series), and the episode after it
    latest = (hist.sort("_pos").group_by("_row", "series_id").agg(pl.col("next_id").last())
              .with_columns(pl.lit(True).alias("_followed")))
    tgt = (pl.DataFrame({"_row": np.arange(n), ITEM_ID: targets.cast(id_type, strict=False)})
           .join(catalogue.select(ITEM_ID).with_columns(pl.lit(True).alias("_in_cat")), on=ITEM_ID,
                 how="left", maintain_order="left")
           .join(episodes.select(ITEM_ID, "series_id"), on=ITEM_ID, how="left", maintain_order="left")
           .join(latest, on=["_row", "series_id"], how="left", maintain_order="left"))
    in_cat = tgt["_in_cat"].fill_null(False).to_numpy()
    episode = tgt["series_id"].is_not_null().to_numpy()
    followed = episode & tgt["_followed"].fill_null(False).to_numpy()
    is_next = (tgt["next_id"] == tgt[ITEM_ID]).fill_null(False).to_numpy()
    out[in_cat & ~episode] = KINDS.index("film")
    out[episode] = KINDS.index("series-start")
    out[followed] = KINDS.index("other-episode")
    out[followed & is_next] = KINDS.index("next-episode")
    return out
