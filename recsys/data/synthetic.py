"""Synthetic streaming-service viewing logs: the embedded demo data and the scale-benchmark data.

The logs look like what a video service's player emits (one row per title played) and carry the structure
that makes next-watch prediction worth doing: series are watched episode after episode, in binge sittings,
picking up days later where the viewer left off. See README "The synthetic data" for the full model.

Everything is vectorised over users in chunks of about ``generate.chunk_events`` events, one output file
per chunk, so memory is bounded at any scale and no Python loop runs per event. Each chunk draws from its
own random stream derived from the seed, so the output is byte-identical for the same configuration.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.config import Config, GenerateConfig
from recsys.schemas import EVENT_TYPE, ITEM_ID, TS, USER_ID, WATCH_SECONDS

log = logging.getLogger(__name__)

CATALOGUE_FILE = "catalogue.parquet"
MANIFEST_FILE = "_manifest.json"
TS_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # ISO-8601 in UTC, as most player logs write it
USER_ID_BASE = 1_000_000
ITEM_ID_BASE = 100_000
EVENT_TYPES = ("complete", "partial", "resume")

GENRES = ("drama", "comedy", "crime", "sci-fi", "documentary", "animation", "thriller", "romance",
          "fantasy", "reality", "kids", "horror")
# Share of the catalogue (and of an average viewer's taste) per genre.
GENRE_SHARE = np.array([18, 15, 12, 8, 8, 7, 9, 6, 5, 5, 4, 3], dtype=np.float64)
GENRE_SHARE /= GENRE_SHARE.sum()
TASTE_CONCENTRATION = 2.5  # Dirichlet concentration of a viewer's genre taste: low = one or two genres
TASTE_BACKGROUND = 0.15  # weight of the average taste mixed into every viewer's

# Relative chance that a sitting starts in each hour (UTC), weekdays and weekends: evening peak.
HOUR_WEIGHTS = np.array([
    [2.0, 1.0, 0.5, 0.3, 0.2, 0.2, 0.3, 0.6, 0.8, 1.0, 1.1, 1.3,
     1.8, 1.8, 1.5, 1.5, 2.0, 2.8, 4.5, 6.5, 8.0, 8.0, 6.5, 4.0],
    [3.0, 2.0, 1.0, 0.5, 0.3, 0.3, 0.4, 0.8, 1.5, 2.5, 3.0, 3.5,
     4.0, 4.0, 4.0, 4.0, 4.2, 4.5, 5.5, 7.0, 8.0, 8.0, 7.0, 5.0],
])
HOUR_CUM = np.cumsum(HOUR_WEIGHTS, axis=1) / HOUR_WEIGHTS.sum(axis=1, keepdims=True)

ENGAGE_EPISODES = 12.0  # mean episodes a viewer watches of one series they follow
FOLLOW_WINDOW_DAYS = 12.0  # mean number of days over which a viewer works through one series
START_FROM_PILOT = 0.6  # chance a viewer starts a series at episode 1 (else mid-way: seen before)
FILM_SITTING_CONTINUE = 0.2  # chance a film is followed by another in the same sitting
RESUME_PROB = 0.35  # chance an abandoned watch is resumed a little later
BREAK_SECONDS = 120  # minimum pause between two sittings of one viewer

_ADJ = ("Silent", "Broken", "Golden", "Hidden", "Last", "Crimson", "Northern", "Lost", "Wild", "Quiet",
        "Electric", "Hollow", "Burning", "Frozen", "Secret", "Velvet", "Iron", "Distant", "Bright",
        "Midnight", "Paper", "Glass", "Savage", "Gentle", "Restless", "Sunken", "Scarlet", "Endless")
_NOUN = ("Harbor", "Kingdom", "Signal", "Garden", "River", "Empire", "Watcher", "Orchard", "Frontier",
         "Station", "Lantern", "Circuit", "Valley", "Tide", "Archive", "Crown", "Summit", "Mirror",
         "Engine", "Compass", "Forest", "Island", "Winter", "Chorus", "Horizon", "Cartel", "Academy")
_PLACE = ("Lisbon", "Oslo", "Marrakesh", "Kyoto", "Tallinn", "Valparaiso", "Glasgow", "Naples",
          "Reykjavik", "Tbilisi", "Montreal", "Hanoi", "Dakar", "Palermo", "Quito", "Bergen")
_NOISE_TS = ("not-a-date", "2026-02-30T25:61:00Z", "yesterday", "NaN", "12/31/99 7pm", "0000-00-00")
_NOISE_KINDS = ("null_user", "null_item", "bad_ts", "ts_out_of_range", "negative_watch", "duplicate")


@dataclass
class _GenreSampler:
    """Draw titles of one kind: pick within a genre with probability proportional to popularity."""

    order: np.ndarray  # [n] title indices sorted by genre
    cum: np.ndarray  # [n] cumulative popularity along ``order``, ends at 1
    lo: np.ndarray  # [G] cumulative popularity where genre g starts (whole range if g has no titles)
    hi: np.ndarray  # [G]

    @classmethod
    def build(cls, genre: np.ndarray, weight: np.ndarray) -> _GenreSampler:
        order = np.argsort(genre, kind="stable")
        cum = np.cumsum(weight[order])
        cum /= cum[-1]
        g_sorted = genre[order]
        lo = np.zeros(len(GENRES))
        hi = np.ones(len(GENRES))
        for g in range(len(GENRES)):
            idx = np.flatnonzero(g_sorted == g)
            if len(idx):
                lo[g] = cum[idx[0] - 1] if idx[0] > 0 else 0.0
                hi[g] = cum[idx[-1]]
        return cls(order, cum, lo, hi)

    def sample(self, rng: np.random.Generator, genre: np.ndarray) -> np.ndarray:
        u = self.lo[genre] + rng.random(len(genre)) * (self.hi[genre] - self.lo[genre])
        pos = np.searchsorted(self.cum, u, side="right")
        return self.order[np.minimum(pos, len(self.order) - 1)]


@dataclass
class _Catalogue:
    """Titles by catalogue index: series episodes first (series by series, in order), then films."""

    item_ids: np.ndarray  # [I] int64 public item id
    duration: np.ndarray  # [I] int64 seconds
    release_day: np.ndarray  # [I] int64 day of the period the title appears (0 = before the period)
    series_start: np.ndarray  # [S] catalogue index of each series' first episode
    series_len: np.ndarray  # [S] episodes per series
    series_release: np.ndarray  # [S]
    film_start: int  # catalogue index of the first film
    series_sampler: _GenreSampler
    film_sampler: _GenreSampler
    frame: pl.DataFrame  # the catalogue.parquet table


def derived_sizes(cfg: GenerateConfig) -> dict[str, int]:
    """Users, series and films for the configured size (explicit settings win)."""
    root = np.sqrt(cfg.n_events)
    return {
        # enough users that nobody needs more than ~8 titles a day (short periods)
        "users": cfg.n_users or max(10, round(cfg.n_events / cfg.events_per_user),
                                    -(-cfg.n_events // (cfg.days * 8))),
        "series": cfg.n_series or int(np.clip(round(root / 3), 12, 50_000)),
        "films": cfg.n_films or int(np.clip(round(root / 1.5), 12, 100_000)),
    }


def _titles(rng: np.random.Generator, n: int) -> list[str]:
    """Invented titles from word lists, e.g. "The Silent Harbor", "Winter of Oslo"."""
    a = rng.integers(0, len(_ADJ), n)
    b = rng.integers(0, len(_NOUN), n)
    c = rng.integers(0, len(_PLACE), n)
    pattern = rng.integers(0, 4, n)
    out = []
    for k in range(n):
        adj, noun, place = _ADJ[a[k]], _NOUN[b[k]], _PLACE[c[k]]
        plural = noun + ("es" if noun.endswith("s") else "s")  # Compasses, not Compasss
        out.append((f"The {adj} {noun}", f"{noun} of {place}", f"{adj} {place}",
                    f"The {plural} of {place}")[pattern[k]])
    return out


def _zipf_weights(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Power-law popularity with the ranks shuffled over the titles."""
    rank = rng.permutation(n) + 1
    return 1.0 / rank.astype(np.float64) ** exponent


def _build_catalogue(cfg: GenerateConfig, rng: np.random.Generator) -> _Catalogue:
    sizes = derived_sizes(cfg)
    n_series, n_films = sizes["series"], sizes["films"]
    # Series: 1-6 seasons of 6-13 episodes, one episode length per series (+-10 %).
    seasons = np.minimum(rng.geometric(0.45, n_series), 6)
    per_season = rng.choice(np.array([6, 8, 10, 12, 13]), n_series)
    series_len = (seasons * per_season).astype(np.int64)
    series_start = np.concatenate([[0], np.cumsum(series_len)[:-1]]).astype(np.int64)
    n_episodes = int(series_len.sum())
    series_genre = rng.choice(len(GENRES), n_series, p=GENRE_SHARE)
    series_minutes = rng.choice(np.array([22, 25, 30, 42, 45, 50, 55, 60]), n_series)
    film_genre = rng.choice(len(GENRES), n_films, p=GENRE_SHARE)
    film_minutes = np.clip(rng.normal(105, 18, n_films), 75, 180)
    new_s = rng.random(n_series) < cfg.new_release_fraction
    series_release = np.where(new_s, rng.integers(1, max(2, cfg.days * 3 // 4), n_series), 0)
    new_f = rng.random(n_films) < cfg.new_release_fraction
    film_release = np.where(new_f, rng.integers(1, max(2, cfg.days * 3 // 4), n_films), 0)

    ep_series = np.repeat(np.arange(n_series), series_len)  # [E]
    ep_index = np.arange(n_episodes) - series_start[ep_series]  # 0-based episode within series
    ep_season = ep_index // per_season[ep_series] + 1
    ep_in_season = ep_index % per_season[ep_series] + 1
    ep_duration = np.round(series_minutes[ep_series] * 60 * rng.uniform(0.9, 1.1, n_episodes))
    duration = np.concatenate([ep_duration, np.round(film_minutes * 60)]).astype(np.int64)
    release_day = np.concatenate([series_release[ep_series], film_release]).astype(np.int64)
    n_items = n_episodes + n_films
    item_ids = ITEM_ID_BASE + rng.permutation(n_items).astype(np.int64)

    series_titles = _titles(rng, n_series)
    film_titles = _titles(rng, n_films)
    ep_titles = [f"{series_titles[s]} S{se:02d}E{e:02d}"
                 for s, se, e in zip(ep_series.tolist(), ep_season.tolist(), ep_in_season.tolist(),
                                     strict=True)]
    start = _start_datetime(cfg)
    frame = pl.DataFrame({
        ITEM_ID: item_ids,
        "title": ep_titles + film_titles,
        "kind": ["series"] * n_episodes + ["film"] * n_films,
        "series_id": pl.Series(np.concatenate([ep_series + 1, np.zeros(n_films, np.int64)]),
                               dtype=pl.Int64),
        "season": pl.Series(np.concatenate([ep_season, np.zeros(n_films, np.int64)]), dtype=pl.Int32),
        "episode": pl.Series(np.concatenate([ep_index + 1, np.zeros(n_films, np.int64)]),
                             dtype=pl.Int32),
        "genre": np.array(GENRES)[np.concatenate([series_genre[ep_series], film_genre])],
        "duration_seconds": pl.Series(duration, dtype=pl.Int32),
        # days since 1970-01-01 is polars' Date representation
        "release_date": pl.Series(release_day + (start.date() - date(1970, 1, 1)).days).cast(pl.Int32)
        .cast(pl.Date),
    })
    is_film = pl.col("kind") == "film"
    frame = frame.with_columns(
        pl.when(is_film).then(None).otherwise(pl.col(c)).alias(c) for c in ("series_id", "season", "episode")
    )
    series_pop = _zipf_weights(rng, n_series, cfg.popularity_exponent)
    film_pop = _zipf_weights(rng, n_films, cfg.popularity_exponent)
    return _Catalogue(
        item_ids=item_ids,
        duration=duration,
        release_day=release_day,
        series_start=series_start,
        series_len=series_len,
        series_release=series_release.astype(np.int64),
        film_start=n_episodes,
        series_sampler=_GenreSampler.build(series_genre, series_pop),
        film_sampler=_GenreSampler.build(film_genre, film_pop),
        frame=frame,
    )


def _start_datetime(cfg: GenerateConfig) -> datetime:
    start = cfg.start_date
    return start.replace(tzinfo=UTC) if start.tzinfo is None else start.astimezone(UTC)


def _user_activity(cfg: GenerateConfig, n_users: int, rng: np.random.Generator) -> np.ndarray:
    """Events per user: log-normal (heavy-tailed), scaled so the total is about n_events."""
    sigma = cfg.activity_sigma
    a = rng.lognormal(-sigma * sigma / 2, sigma, n_users) if sigma > 0 else np.ones(n_users)
    expected_resumes = cfg.partial_fraction * RESUME_PROB
    target = cfg.n_events / (1 + expected_resumes)
    cap = max(4, cfg.days * 16)  # nobody watches more than ~16 titles a day on average
    scale = target / a.sum()
    for _ in range(8):  # re-scale so the capped activities still add up to the target
        n_u = np.clip(np.round(a * scale), 2, cap).astype(np.int64)
        if n_u.sum() >= 0.995 * target or (n_u == cap).all():
            break
        scale *= target / max(n_u.sum(), 1)
    if n_u.sum() < 0.9 * target:
        log.warning("only %d of %d events fit %d users over %d days: raise n_users or days",
                    n_u.sum(), cfg.n_events, n_users, cfg.days)
    return n_u


def _segment_index(lengths: np.ndarray) -> np.ndarray:
    """0..len-1 within each segment, for segments laid out one after another."""
    total = int(lengths.sum())
    starts = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)


def _pick_genre(rng: np.random.Generator, cum_taste: np.ndarray) -> np.ndarray:
    """One genre per row from each row's cumulative taste distribution."""
    u = rng.random(len(cum_taste))
    return np.minimum((cum_taste < u[:, None]).sum(axis=1), len(GENRES) - 1)


def _sitting_start(rng: np.random.Generator, day: np.ndarray, start_weekday: int) -> np.ndarray:
    """Seconds from the period start for sittings on ``day``: hour from the time-of-day profile."""
    weekend = ((start_weekday + day) % 7 >= 5).astype(np.int64)
    u = rng.random(len(day))
    hour = np.where(weekend == 1, np.searchsorted(HOUR_CUM[1], u), np.searchsorted(HOUR_CUM[0], u))
    return day * 86_400 + np.minimum(hour, 23) * 3600 + rng.integers(0, 3600, len(day))


def _chunk_frame(cat: _Catalogue, cfg: GenerateConfig, rng: np.random.Generator, n_u: np.ndarray,
                 user_lo: int, start_weekday: int) -> pl.DataFrame:
    """Clean events of users ``user_lo .. user_lo+len(n_u)-1`` (numeric ts, unordered)."""
    m = len(n_u)
    days = cfg.days
    taste = rng.gamma(TASTE_CONCENTRATION * GENRE_SHARE, size=(m, len(GENRES)))  # [m, G]
    taste /= np.maximum(taste.sum(axis=1, keepdims=True), 1e-12)
    cum_taste = np.cumsum((1 - TASTE_BACKGROUND) * taste + TASTE_BACKGROUND * GENRE_SHARE, axis=1)
    s_u = rng.binomial(n_u, cfg.series_share)  # series episodes per user
    f_u = n_u - s_u  # films per user

    # --- series: each user follows a few series and works through each in order --------------------
    k_u = np.where(s_u > 0, 1 + rng.poisson(np.maximum(s_u / ENGAGE_EPISODES - 1, 0)), 0)
    follow_user = np.repeat(np.arange(m), k_u)  # [K]
    series = cat.series_sampler.sample(rng, _pick_genre(rng, cum_taste[follow_user]))  # [K]
    s_len = cat.series_len[series]
    rel = cat.series_release[series]
    first_ep = np.where((rng.random(len(series)) < START_FROM_PILOT) | (rel > 0), 0,
                        (rng.random(len(series)) * s_len).astype(np.int64))
    ev_user = np.repeat(np.arange(m), s_u)
    k_off = np.cumsum(k_u) - k_u
    # The first series a user follows gets the most episodes (rand**1.5 favours low indices).
    local = (rng.random(len(ev_user)) ** 1.5 * k_u[ev_user]).astype(np.int64)
    per_follow = np.bincount(k_off[ev_user] + local, minlength=len(series))
    ev_follow = np.repeat(np.arange(len(series)), per_follow)  # [Ns] grouped by follow
    j = _segment_index(per_follow)  # episodes watched of this series so far
    episode = (first_ep[ev_follow] + j) % s_len[ev_follow]  # wraps round: a re-watch from the start
    s_item = cat.series_start[series[ev_follow]] + episode
    s_new_block = (j == 0) | (rng.random(len(j)) < 1.0 / cfg.binge_mean_episodes)
    sb_follow = ev_follow[s_new_block]  # [Bs] sittings, grouped by follow, in watch order
    f_begin = rel + rng.random(len(series)) * (days - rel)
    f_window = np.minimum(rng.exponential(FOLLOW_WINDOW_DAYS, len(series)), days - f_begin)
    sb_day = np.minimum(f_begin[sb_follow] + rng.random(len(sb_follow)) * f_window[sb_follow],
                        days - 1e-9).astype(np.int64)
    sb_start = _sitting_start(rng, sb_day, start_weekday)
    # Sittings of one series happen in episode order: sort the drawn times within each follow
    # (one sort of follow * 2**bits + start; the start is the low bits).
    bits = np.int64(int(days * 86_400).bit_length() + 1)
    sb_start = np.sort(sb_follow * (np.int64(1) << bits) + sb_start) & ((np.int64(1) << bits) - 1)
    sb_user = follow_user[sb_follow]

    # --- films: by taste and popularity, sometimes two in a sitting, sometimes one seen before ------
    fe_user = np.repeat(np.arange(m), f_u)  # [Nf]
    film = cat.film_sampler.sample(rng, _pick_genre(rng, cum_taste[fe_user]))
    f_item = cat.film_start + film
    f_off = np.cumsum(f_u) - f_u
    rewatch = rng.random(len(f_item)) < cfg.rewatch_fraction
    other = f_off[fe_user] + (rng.random(len(f_item)) * f_u[fe_user]).astype(np.int64)
    f_item = np.where(rewatch, f_item[other], f_item)
    f_new_block = (_segment_index(f_u) == 0) | (rng.random(len(f_item)) >= FILM_SITTING_CONTINUE)
    fb_first = np.flatnonzero(f_new_block)
    fb_rel = np.maximum.reduceat(cat.release_day[f_item], fb_first) if len(fb_first) else fb_first
    fb_day = np.minimum(fb_rel + rng.random(len(fb_first)) * (days - fb_rel), days - 1e-9).astype(np.int64)
    fb_start = _sitting_start(rng, fb_day, start_weekday)
    fb_user = fe_user[fb_first]

    # --- events of all sittings, sitting after sitting ----------------------------------------------
    item = np.concatenate([s_item, f_item])  # [N] catalogue index
    new_block = np.concatenate([s_new_block, f_new_block])
    b_user = np.concatenate([sb_user, fb_user])  # [B]
    b_start_raw = np.concatenate([sb_start, fb_start])
    dur = cat.duration[item].astype(np.float64)
    partial = rng.random(len(item)) < cfg.partial_fraction
    frac = np.where(partial, rng.uniform(0.03, 0.9, len(item)), rng.uniform(0.93, 1.0, len(item)))
    resumed = partial & (rng.random(len(item)) < RESUME_PROB)
    # A resumed watch is a second event on the same title a few minutes later, watching the rest.
    src = np.repeat(np.arange(len(item)), 1 + resumed.astype(np.int64))
    is_resume = np.zeros(len(src), dtype=bool)
    is_resume[1:] = src[1:] == src[:-1]
    item = item[src]
    watch = np.where(is_resume, dur[src] * (1 - frac[src]), dur[src] * frac[src])
    watch = np.round(watch, 1)
    etype = np.where(is_resume, 2, np.where(partial[src], 1, 0)).astype(np.int8)
    first_in_block = new_block[src] & ~is_resume
    ev_block = np.cumsum(first_in_block) - 1  # [N'] sitting of each event
    lead = np.where(first_in_block, 0,
                    np.where(is_resume, rng.integers(120, 1200, len(src)), rng.integers(5, 40, len(src))))
    step = lead + np.ceil(watch).astype(np.int64)  # seconds from the previous event's end to this one's
    acc = np.cumsum(step)
    block_first = np.flatnonzero(first_in_block)
    block_acc0 = (acc - step)[block_first]  # accumulated seconds before each sitting
    offset = acc - np.ceil(watch).astype(np.int64) - block_acc0[ev_block]  # start within the sitting
    b_dur = np.add.reduceat(step, block_first) + BREAK_SECONDS

    # One viewer watches one thing at a time: push a sitting that overlaps the previous one to its end.
    # start'_i = max(start_i, start'_{i-1} + dur_{i-1})  ==  running max of (start_i - D_i) + D_i,
    # with D the cumulative duration; a per-user offset keeps the running max within each user.
    order = np.argsort(b_user * (np.int64(1) << bits) + b_start_raw, kind="stable")  # by user, start
    su, ss, sd = b_user[order], b_start_raw[order], b_dur[order]
    d_excl = np.cumsum(sd) - sd
    big = np.int64(1) << np.int64(40)
    x = np.maximum.accumulate(ss - d_excl + su * big)
    b_start = np.empty_like(b_start_raw)
    b_start[order] = x - su * big + d_excl

    ts = b_start[ev_block] + offset  # [N'] seconds from period start
    epoch = int(_start_datetime(cfg).timestamp())
    frame = pl.DataFrame({
        USER_ID: USER_ID_BASE + user_lo + b_user[ev_block],
        ITEM_ID: cat.item_ids[item],
        TS: ts + epoch,
        WATCH_SECONDS: watch,
        EVENT_TYPE: etype,
    })
    return frame


def _finish_chunk(frame: pl.DataFrame, noise_fraction: float, noise_seed: np.random.SeedSequence,
                  path: Path, fmt: str) -> tuple[int, dict[str, int]]:
    """Order by time, format, corrupt a few rows, write. Runs in the writer thread (polars, no GIL)."""
    # Ordered by time (ties by user) as a log file is; ts + user is unique, so the order is total.
    frame = frame.sort(TS, USER_ID).with_columns(
        pl.from_epoch(TS, "s").dt.strftime(TS_FORMAT),
        pl.col(EVENT_TYPE).replace_strict(dict(enumerate(EVENT_TYPES)), return_dtype=pl.String),
    )
    frame, counts = _add_noise(frame, noise_fraction, np.random.default_rng(noise_seed))
    _write(frame, path, fmt)
    return frame.height, counts


def _add_noise(df: pl.DataFrame, fraction: float, rng: np.random.Generator) -> tuple[pl.DataFrame, dict]:
    """Corrupt about ``fraction`` of the rows on purpose: what a real log collector lets through."""
    n = df.height
    n_noise = min(int(rng.binomial(n, fraction)) if fraction > 0 else 0, n - 1)
    counts = dict.fromkeys(_NOISE_KINDS, 0)
    if n_noise <= 0:
        return df, counts
    pos = np.sort(rng.choice(np.arange(1, n), n_noise, replace=False))
    kind = rng.integers(0, len(_NOISE_KINDS), n_noise)
    cols = {c: df[c] for c in df.columns}
    dup = pos[kind == 5]  # an exact copy of the row before (collectors retry and double-send)
    if len(dup):
        for c in cols:
            cols[c] = cols[c].scatter(dup, cols[c].gather(dup - 1))
    p = pos[kind == 0]
    cols[USER_ID] = cols[USER_ID].scatter(p, None)
    p = pos[kind == 1]
    cols[ITEM_ID] = cols[ITEM_ID].scatter(p, None)
    p = pos[kind == 2]
    cols[TS] = cols[TS].scatter(p, np.array(_NOISE_TS)[rng.integers(0, len(_NOISE_TS), len(p))])
    p = pos[kind == 3]
    far = np.where(rng.random(len(p)) < 0.5, "1970-01-01T00:00:00Z", "2199-12-31T23:59:59Z")
    cols[TS] = cols[TS].scatter(p, far)
    p = pos[kind == 4]
    cols[WATCH_SECONDS] = cols[WATCH_SECONDS].scatter(p, -cols[WATCH_SECONDS].gather(p) - 1.0)
    for k, name in enumerate(_NOISE_KINDS):
        counts[name] = int((kind == k).sum())
    return pl.DataFrame(cols), counts


def _write(df: pl.DataFrame, path: Path, fmt: str) -> None:
    if fmt == "parquet":
        df.write_parquet(path, compression="zstd")
    elif fmt == "csv":
        df.write_csv(path)
    else:
        df.write_ndjson(path)


def _chunk_bounds(n_u: np.ndarray, chunk_events: int) -> list[tuple[int, int]]:
    """User ranges holding about ``chunk_events`` events each."""
    cum = np.cumsum(n_u)
    cuts = np.searchsorted(cum, np.arange(chunk_events, int(cum[-1]), chunk_events), side="right")
    edges = np.unique(np.concatenate([[0], cuts, [len(n_u)]]))
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def _clear_stale(out_dir: Path) -> None:
    """Remove temp dirs left by killed runs (their pid no longer exists)."""
    for stale in out_dir.parent.glob(f".{out_dir.name}.*-*"):
        try:
            pid = int(stale.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            continue


def _publish(tmp: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``tmp`` with renames: readers see the old set or the new, never half."""
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def generate(config: Config, out_dir: Path | None = None) -> dict[str, Any]:
    """Write synthetic viewing logs (``part-NNNNN.<fmt>``) and ``catalogue.parquet`` into ``out_dir``.

    Returns what was written: files, counts (events, users, items, noise rows by kind), timing.
    """
    cfg = config.generate
    out_dir = Path(out_dir) if out_dir is not None else config.paths.raw_dir / "synthetic"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale(out_dir)
    t0 = time.perf_counter()
    seed_seq = np.random.SeedSequence(cfg.seed)
    cat_seq, users_seq = seed_seq.spawn(2)  # chunk i uses spawn_key (2, i)
    cat = _build_catalogue(cfg, np.random.default_rng(cat_seq))
    sizes = derived_sizes(cfg)
    n_u = _user_activity(cfg, sizes["users"], np.random.default_rng(users_seq))
    bounds = _chunk_bounds(n_u, cfg.chunk_events)
    start_weekday = _start_datetime(cfg).weekday()
    ext = {"parquet": "parquet", "csv": "csv", "ndjson": "ndjson"}[cfg.format]

    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files: list[str] = []
    noise = dict.fromkeys(_NOISE_KINDS, 0)
    events = 0
    try:
        cat.frame.write_parquet(tmp / CATALOGUE_FILE)
        # One writer thread: chunk i is compressed and written while chunk i+1 is generated.
        # One writer thread: chunk i is sorted, formatted and written while chunk i+1 is generated.
        results: list[tuple[int, dict[str, int]]] = []
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending: Future | None = None
            for i, (lo, hi) in enumerate(bounds):
                rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(2, i)))
                frame = _chunk_frame(cat, cfg, rng, n_u[lo:hi], lo, start_weekday)
                if pending is not None:
                    results.append(pending.result())  # at most two chunks in memory
                name = f"part-{i:05d}.{ext}"
                files.append(name)
                pending = pool.submit(_finish_chunk, frame, cfg.noise_fraction,
                                      np.random.SeedSequence(cfg.seed, spawn_key=(3, i)), tmp / name,
                                      cfg.format)
                del frame
                log.debug("chunk %d: users %d-%d", i, lo, hi)
            if pending is not None:
                results.append(pending.result())
        for height, counts in results:
            events += height
            for k, v in counts.items():
                noise[k] += v
        seconds = time.perf_counter() - t0
        result: dict[str, Any] = {
            "out_dir": str(out_dir),
            "files": [str(out_dir / f) for f in files],
            "catalogue": str(out_dir / CATALOGUE_FILE),
            "format": cfg.format,
            "events": events,
            "users": int(len(n_u)),
            "items": int(len(cat.item_ids)),
            "series": int(len(cat.series_len)),
            "episodes": int(cat.film_start),
            "films": int(len(cat.item_ids) - cat.film_start),
            "noise_rows": int(sum(noise.values())),
            "noise": noise,
            "seconds": round(seconds, 3),
            "events_per_second": round(events / max(seconds, 1e-9)),
        }
        manifest = {k: v for k, v in result.items() if k not in ("seconds", "events_per_second")}
        manifest["files"] = files
        manifest["catalogue"] = CATALOGUE_FILE
        manifest.pop("out_dir")
        manifest["config"] = cfg.model_dump(mode="json")
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("generated %d events (%d users, %d items) in %.1f s into %s", events, len(n_u),
             len(cat.item_ids), result["seconds"], out_dir)
    return result
