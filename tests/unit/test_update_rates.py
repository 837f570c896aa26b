"""Rate-based initialisation of new titles (recsys.training.update): a title released yesterday is
compared with known titles by plays per day since its release, not by its one-day count."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import numpy as np
import polars as pl
import pytest
import torch

from recsys.data.vocab import Vocab
from recsys.schemas import COUNT, IDX, ITEM_ID, ITEM_TS, ITEMS, USER_ID
from recsys.training.update import grow_vocab, init_new_rows, item_rates, rate_line_bias, refresh_young_rows

CUTOFF = datetime(2026, 1, 20, tzinfo=UTC)
DAYS = 7.0
PER_DAY = {1: 1, 2: 2, 3: 4, 4: 8, 5: 12, 6: 16}  # known films: plays per day over the whole window


def _world():
    """Six known films playing every day of the window at their rate, and film 9 released the day before
    the cutoff with 12 plays on that day (as many per day as film 5, as many in all as film 1 or 2)."""
    items, stamps = [], []
    for item, per_day in PER_DAY.items():
        for day in range(int(DAYS)):
            t = CUTOFF - timedelta(days=DAYS - day) + timedelta(hours=1)
            items += [item] * per_day
            stamps += [t + timedelta(minutes=m) for m in range(per_day)]
    items += [9] * 12
    stamps += [CUTOFF - timedelta(hours=20) + timedelta(minutes=m) for m in range(12)]
    frame = pl.DataFrame({USER_ID: np.arange(len(items)), ITEMS: [[i] for i in items],
                          ITEM_TS: [[t] for t in stamps]},
                         schema_overrides={ITEM_TS: pl.List(pl.Datetime("us", "UTC"))})
    parent = Vocab(pl.DataFrame({ITEM_ID: list(PER_DAY), IDX: np.arange(len(PER_DAY), dtype=np.int32),
                                 COUNT: [7 * c for c in PER_DAY.values()]}))
    vocab = grow_vocab(parent, pl.Series([9]))
    catalogue = pl.DataFrame({ITEM_ID: [*PER_DAY, 9], "kind": ["film"] * 7, "genre": ["drama"] * 7,
                              "series_id": pl.Series([None] * 7, dtype=pl.Int64),
                              "release_date": [date(2025, 6, 1)] * 6 + [date(2026, 1, 19)]})
    torch.manual_seed(0)
    n = len(PER_DAY)
    state = {"item_out": torch.randn(n, 4), "item_bias": torch.arange(n, dtype=torch.float32)}  # bias = idx
    return frame, parent, vocab, catalogue, state


def test_a_film_released_yesterday_is_compared_by_plays_per_day_since_its_release():
    frame, parent, vocab, catalogue, state = _world()
    rates, days = item_rates(frame, vocab, CUTOFF, DAYS, catalogue)
    assert days.tolist() == [7.0] * 6 + [1.0]
    assert np.allclose(rates, [*PER_DAY.values(), 12.0])
    # by plays per day, film 9 is film 5 (index 4), not film 1/2, whose window count (7, 14) is near 12
    mature = days >= DAYS
    out, _ = init_new_rows(state, parent, vocab, rates, catalogue, neighbours=1, mature=mature)
    assert out["item_bias"][-1].item() == 4.0
    assert torch.allclose(out["item_out"][-1], state["item_out"][4])
    counts = np.bincount(vocab.index_of(frame[ITEMS].explode()), minlength=len(vocab))
    by_count, _ = init_new_rows(state, parent, vocab, counts, catalogue, neighbours=1)
    assert by_count["item_bias"][-1].item() in (0.0, 1.0)  # the old rule: a 1-day count
    # after the update's pass, the young title gets its rate neighbours' rows again
    drifted = {"item_out": out["item_out"].clone(), "item_bias": out["item_bias"].clone()}
    drifted["item_out"][-1] = 0.0
    drifted["item_bias"][-1] = -5.0
    fresh = refresh_young_rows(drifted, vocab, rates, mature, ~mature, catalogue, neighbours=1)
    assert fresh["item_bias"][-1].item() == 4.0
    assert torch.allclose(fresh["item_out"][-1], state["item_out"][4])
    assert torch.equal(fresh["item_out"][:-1], drifted["item_out"][:-1])  # known titles untouched


def test_a_mean_of_rows_keeps_the_neighbours_length():
    frame, parent, vocab, catalogue, state = _world()
    rates, days = item_rates(frame, vocab, CUTOFF, DAYS, catalogue)
    out, _ = init_new_rows(state, parent, vocab, rates, catalogue, neighbours=3, mature=days >= DAYS)
    near = state["item_out"][[3, 4, 5]]  # films 4, 5, 6: 8, 12, 16 plays a day
    assert torch.allclose(out["item_out"][-1].norm(), near.norm(dim=1).mean(), atol=1e-5)
    assert torch.nn.functional.cosine_similarity(out["item_out"][-1], near.mean(0), dim=0) > 0.999


def test_a_film_out_today_starts_at_the_early_rate_of_recent_releases_not_at_zero():
    """Film 9 out the day before (12 plays a day), films 10 and 11 out on the cutoff day with no plays,
    film 7 an old catalogue film nobody played: 10 and 11 get the recent films' median (12), 7 keeps 0."""
    frame, parent, _, catalogue, state = _world()
    parent = Vocab(pl.DataFrame({ITEM_ID: [*PER_DAY, 7], IDX: np.arange(len(PER_DAY) + 1, dtype=np.int32),
                                 COUNT: [7 * c for c in PER_DAY.values()] + [0]}))
    state = {"item_out": torch.cat([state["item_out"], torch.zeros(1, 4)]),
             "item_bias": torch.arange(len(PER_DAY) + 1, dtype=torch.float32)}
    vocab = grow_vocab(parent, pl.Series([9, 10, 11]))
    catalogue = pl.concat([catalogue, pl.DataFrame(
        {ITEM_ID: [7, 10, 11], "kind": ["film"] * 3, "genre": ["drama"] * 3,
         "series_id": pl.Series([None] * 3, dtype=pl.Int64),
         "release_date": [date(2025, 6, 1), CUTOFF.date(), CUTOFF.date()]})])
    rates, days = item_rates(frame, vocab, CUTOFF, DAYS, catalogue)
    assert days[vocab.index_of(pl.Series([10, 11]))].tolist() == [1.0, 1.0]
    assert rates[vocab.index_of(pl.Series([7]))].tolist() == [0.0]  # old and unplayed: no prior
    assert rates[vocab.index_of(pl.Series([10, 11]))].tolist() == [12.0, 12.0]  # film 9's early rate
    out, _ = init_new_rows(state, parent, vocab, rates, catalogue, neighbours=1, mature=days >= DAYS)
    for item in (10, 11):  # the rows of film 5 (12 plays a day), not of the least-played film
        at = int(vocab.index_of(pl.Series([item]))[0])
        assert out["item_bias"][at].item() == 4.0
        assert torch.allclose(out["item_out"][at], state["item_out"][4])


def test_a_young_title_hotter_than_every_known_one_scores_on_the_rate_line_past_them():
    """Known films score 0.5 * log(rate) + 1 on average over viewers; young film 9 plays 64 times a day,
    four times the hottest known film, so its rate-neighbour rows put it at that film's score: the line
    lifts it to 0.5 * log(64) + 1, and leaves every known title's bias alone."""
    _, _, vocab, catalogue, _ = _world()
    rates = np.array([*PER_DAY.values(), 64.0])
    mature = np.array([True] * 6 + [False])
    centre = torch.tensor([1.0, 0.0, 0.0, 0.0])  # [H] the mean viewer state
    target = 0.5 * np.log(rates) + 1.0
    item_out = torch.zeros(7, 4)
    item_out[:, 0] = torch.tensor([0.1, -0.2, 0.3, 0.0, 0.2, -0.1, -0.1])  # row . centre
    bias = torch.tensor(target, dtype=torch.float32) - item_out[:, 0]
    bias[-1] = bias[5]  # as refresh_young_rows leaves it: the hottest known film's bias and row
    item_out[-1] = item_out[5]
    state = {"item_out": item_out, "item_bias": bias}
    out, slopes = rate_line_bias(state, vocab, rates, mature, ~mature, catalogue, centre)
    assert slopes == {"film": 0.5}
    mean_score = out["item_out"] @ centre + out["item_bias"]  # [7]
    assert mean_score.tolist() == pytest.approx(target.tolist(), abs=1e-5)
    assert torch.equal(out["item_bias"][:-1], bias[:-1])
    # a model that scores hotter titles lower (slope < 0) leaves the young title where its rows put it
    flat = {"item_out": item_out, "item_bias": bias - 2 * torch.log(torch.tensor(rates, dtype=torch.float32))}
    flat["item_bias"][-1] = flat["item_bias"][5]
    kept, slopes = rate_line_bias(flat, vocab, rates, mature, ~mature, catalogue, centre)
    assert slopes == {"film": 0.0}
    assert kept["item_bias"][-1] != flat["item_bias"][-1]  # moved to the (flat) mean of the known films
    known_mean = (flat["item_out"][:-1] @ centre + flat["item_bias"][:-1]).mean()
    young_score = kept["item_out"][-1] @ centre + kept["item_bias"][-1]
    assert young_score.item() == pytest.approx(known_mean.item(), abs=1e-5)


def test_known_titles_all_played_alike_draw_a_flat_rate_line():
    """Six known films at one rate say nothing about how the score grows with the rate: the young film
    goes to their mean score, whatever its own rate."""
    _, _, vocab, catalogue, _ = _world()
    rates = np.array([4.0] * 6 + [64.0])
    mature = np.array([True] * 6 + [False])
    centre = torch.tensor([1.0, 0.0, 0.0, 0.0])
    state = {"item_out": torch.zeros(7, 4), "item_bias": torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 9.0])}
    out, slopes = rate_line_bias(state, vocab, rates, mature, ~mature, catalogue, centre)
    assert slopes == {"film": 0.0}
    assert out["item_bias"][-1].item() == pytest.approx(2.5)


def test_the_mean_viewer_state_is_the_mean_final_state_of_the_known_items_of_each_sequence():
    """Unknown items are skipped, only the last ``max_len`` items count, a sequence with nothing known
    is left out: the vectorised batch equals running each sequence through the model by itself."""
    from recsys.config import load_config
    from recsys.model.gru4rec import GRU4Rec
    from recsys.training.update import mean_state

    vocab = Vocab(pl.DataFrame({ITEM_ID: [10, 11, 12, 13], IDX: np.arange(4, dtype=np.int32),
                                COUNT: [1] * 4}))
    frame = pl.DataFrame({USER_ID: [1, 2, 3, 4], ITEMS: [[10, 99, 11], [12], [99, 98], [13, 12, 11, 10, 12]]})
    torch.manual_seed(0)
    model = GRU4Rec(4, load_config(None, ["model.hidden_size=6"]).model).eval()
    got = mean_state(model, frame, vocab, n=4, seed=0, max_len=3)  # [H]
    with torch.no_grad():
        each = [model.final_states(torch.tensor([s]), torch.tensor([len(s)]))[0]
                for s in ([0, 1], [2], [1, 0, 2])]  # known items of the last 3 of each sequence
    assert torch.allclose(got, torch.stack(each).mean(dim=0), atol=1e-6)
