"""Per-kind decomposition of next-watch targets: only the history and the catalogue decide the kind."""

from __future__ import annotations

import polars as pl

from recsys.training.target_kinds import KINDS, next_episodes, target_kinds

# series 10: S1E1 (1), S1E2 (2), S2E1 (3); series 20: E1 (4), E2 (5); film 9
CATALOGUE = pl.DataFrame({"item_id": [3, 1, 2, 5, 4, 9], "series_id": [10, 10, 10, 20, 20, None],
                          "season": [2, 1, 1, 1, 1, None], "episode": [1, 1, 2, 2, 1, None]})


def kinds(histories: list[list[int]], targets: list[int], catalogue: pl.DataFrame | None = CATALOGUE):
    hist = pl.Series(histories, dtype=pl.List(pl.Int64))
    return [KINDS[k] for k in target_kinds(hist, pl.Series(targets, dtype=pl.Int64), catalogue)]


def test_next_episode_follows_catalogue_order_across_seasons():
    nxt = dict(next_episodes(CATALOGUE).select("item_id", "next_id").iter_rows())
    assert nxt == {1: 2, 2: 3, 3: None, 4: 5, 5: None}


def test_each_target_gets_its_kind_from_the_latest_watched_episode_of_its_series():
    assert kinds(
        [[1, 2], [1, 2, 4], [4], [9], [3, 1], [], [1, 5], [2, 1]],
        [3, 5, 1, 9, 2, 7, 1, 3],
    ) == [
        "next-episode",  # S1E2 -> S2E1 across the season boundary
        "next-episode",  # another series watched in between: still its next episode
        "series-start",  # series 10 never watched
        "film",
        "next-episode",  # re-watching: the latest watched episode (S1E1) decides, not the furthest
        "unknown",  # not in the catalogue
        "other-episode",  # a re-watch of an earlier episode
        "other-episode",  # a skip (S1E1 -> S2E1)
    ]


def test_without_series_columns_every_catalogue_item_is_a_film():
    films = CATALOGUE.select("item_id")
    assert kinds([[1], [2]], [3, 42], films) == ["film", "unknown"]
    assert kinds([[1]], [3], None) == ["unknown"]
