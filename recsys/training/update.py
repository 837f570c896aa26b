"""Daily incremental update: grow a trained model's vocabulary and warm-start a short training pass.

Why: a GRU4Rec model recommends only items of its vocabulary, so with a weekly training a title released
on Monday waits up to a week for its first recommendation. The update keeps the parent model and

1. **grows the vocabulary**: items in the split's train + valid sequences (events before the test cutoff)
   that the parent does not know, plus catalogue items released in ``[cutoff - update.new_days, as_of]``,
   are appended after the parent's items, so every old index (and every old row) is unchanged and
   exports and histories never remap;
2. **initialises the new rows** from what is known: an episode of a known series gets the mean row
   (``item_out``, and ``item_in`` when the model has one) and bias of its series (one audience); any
   other new item the mean row and bias of the ``update.neighbours`` known items of its genre and kind
   whose plays per day (since release, over the last ``update.new_days`` days; :func:`item_rates`; a
   title out today with no plays yet: the median of the recent releases of its kind) are nearest,
   scaled to their mean length (a film's popularity lives mostly in its row). After the pass the titles
   released within ``update.new_days`` get those rows again (:func:`refresh_young_rows`);
3. **trains a short warm-started pass** (``update.epochs``, learning rate ``train.learning_rate *
   update.lr_scale``, a fresh optimiser) over the sequences that end in the new window plus a random
   replay of older ones (``update.replay_fraction`` of the pass), so the model learns the new items
   without forgetting the rest. The new window is the last ``update.new_days`` days before the cutoff,
   or less when the parent is itself an update: then only the events after the parent's cutoff.

It never trains on the test window: the promotion gate compares parent and update on it. A checkpoint
after every epoch (``last.pt``) lets a killed update resume; the result is ``updated.pt`` in its own
directory, so the parent (and the registry) are untouched until the caller registers it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from recsys.config import Config
from recsys.data.catalogue import episode_order
from recsys.data.sequences import SequenceSet
from recsys.data.vocab import Vocab
from recsys.device import resolve_device
from recsys.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from recsys.model.gru4rec import GRU4Rec
from recsys.model.policy import resolve_mask_seen, resolve_policy
from recsys.model.step import SessionParallelTrainer
from recsys.schemas import (
    COUNT,
    END_TS,
    IDX,
    ITEM_ID,
    ITEM_TS,
    ITEMS,
    SESSION_ID,
    STATS_FILE,
    TRAIN_FILE,
    USER_ID,
    VALID_FILE,
    VOCAB_IDX_DTYPE,
)
from recsys.training.epochs import rng_state, run_epoch, set_rng_state

log = logging.getLogger(__name__)

LAST = "last.pt"
UPDATED = "updated.pt"
ROW_TABLES = ("item_out", "item_in")  # per-item rows [n_items, D]; item_bias [n_items] is set apart
INIT_SOURCES = ("series", "genre", "popularity")
LINEAGE_KEY = "update"  # in the checkpoint's extra: parent, cutoff, new items (see UpdateResult)


@dataclass
class UpdateResult:
    checkpoint: Path
    parent: str  # the parent's label, e.g. "version 3"
    events_up_to: str  # ISO time: the update trained on events before it
    n_parent_items: int
    n_items: int
    init_sources: dict[str, int]  # new items initialised from each source
    new_sequences: int
    replay_sequences: int
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    resumed: bool = False

    @property
    def n_new_items(self) -> int:
        return self.n_items - self.n_parent_items


# --- vocabulary growth ------------------------------------------------------------------------------


def grow_vocab(parent: Vocab, new_ids: pl.Series, counts: np.ndarray | None = None) -> Vocab:
    """The parent's vocabulary with ``new_ids`` appended (ids already known are ignored).

    Old items keep their index, id and count; the new ones get ``len(parent)..`` in the given order.
    ``counts`` (optional, [len(grown)]) is added to every item's count (events seen by the update).
    """
    dtype = parent.item_ids.dtype
    ids = new_ids.cast(dtype, strict=False).drop_nulls().unique(maintain_order=True)
    ids = ids.filter(pl.Series(parent.index_of(ids) < 0)) if len(ids) else ids
    added = pl.DataFrame({
        ITEM_ID: ids.rename(ITEM_ID),
        IDX: pl.Series(IDX, np.arange(len(parent), len(parent) + len(ids)), dtype=VOCAB_IDX_DTYPE),
        COUNT: pl.Series(COUNT, np.zeros(len(ids), dtype=np.int64), dtype=pl.Int64),
    })
    frame = pl.concat([parent.frame.select(ITEM_ID, IDX, COUNT), added])
    if counts is not None:
        added_counts = pl.Series(np.asarray(counts, dtype=np.int64))
        frame = frame.with_columns((pl.col(COUNT) + added_counts).alias(COUNT))
    return Vocab(frame)


def _group_mean_rows(tables: dict[str, torch.Tensor], known: pl.DataFrame, new: pl.DataFrame,
                     keys: list[str]) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """For each new item, the mean known row of its group (same ``keys``): (has group [n_new], rows)."""
    known = known.drop_nulls(keys)
    if known.height == 0 or any(k not in new.columns for k in keys):
        return np.zeros(new.height, dtype=bool), {}
    groups = known.select(keys).unique(maintain_order=True).with_row_index("_g")
    known_g = known.join(groups, on=keys, how="left", maintain_order="left")
    g = torch.tensor(known_g["_g"].cast(pl.Int64).to_numpy())  # [k]
    idx = torch.tensor(known_g[IDX].cast(pl.Int64).to_numpy())  # [k]
    n_groups = groups.height
    sizes = torch.bincount(g, minlength=n_groups).clamp(min=1).unsqueeze(1)  # [G, 1]
    new_g = new.join(groups, on=keys, how="left", maintain_order="left")["_g"]
    has = new_g.is_not_null().to_numpy()
    pick = torch.tensor(new_g.fill_null(0).cast(pl.Int64).to_numpy())  # [n_new]
    rows = {}
    for name, table in tables.items():
        sums = torch.zeros(n_groups, table.shape[1], dtype=table.dtype).index_add_(0, g, table[idx])  # [G, D]
        rows[name] = (sums / sizes)[pick]  # [n_new, D]
    return has, rows


def _group_neighbour_rows(tables: dict[str, torch.Tensor], known: pl.DataFrame, new: pl.DataFrame,
                          keys: list[str], rates: np.ndarray, new_rates: np.ndarray, k: int,
                          ) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """For each new item, the mean row of the ``k`` known items of its group (same ``keys``) whose
    ``rates`` (indexed by vocabulary index) are nearest to its own: (has group [n_new], rows [n_new, D]).

    Why: a film's popularity lives mostly in its row (its dot product with every viewer state), so the
    plain mean of a genre is a title nobody watches; the mean of the genre's films as hot as the new
    one starts it where it belongs."""
    known = known.drop_nulls(keys)
    has = np.zeros(new.height, dtype=bool)
    rows = {name: torch.zeros(new.height, t.shape[1], dtype=t.dtype) for name, t in tables.items()}
    if known.height == 0 or any(c not in new.columns for c in keys):
        return has, rows
    groups = known.partition_by(keys, as_dict=True)
    key_rows = new.select(keys).rows()
    for key, members in groups.items():
        at = np.flatnonzero(np.array([r == key for r in key_rows], dtype=bool))
        if not len(at):
            continue
        idx = members[IDX].cast(pl.Int64).to_numpy()  # [m]
        near = torch.from_numpy(idx[_popularity_neighbours(rates[idx], new_rates[at], k)])  # [a, k]
        for name, t in tables.items():
            mean = t[near].mean(dim=1)  # [a, D]
            if t.shape[1] > 1:  # a mean of k rows is shorter than each of them: give it their length
                mean = mean * (t[near].norm(dim=2).mean(dim=1) / mean.norm(dim=1).clamp(min=1e-12))[:, None]
            rows[name][torch.from_numpy(at)] = mean
        has[at] = True
    return has, rows


def _popularity_neighbours(known_counts: np.ndarray, new_counts: np.ndarray, k: int) -> np.ndarray:
    """Per new item, the ``k`` known items whose (log) window count is nearest: [n_new, k] indices."""
    n_known = len(known_counts)
    k = max(1, min(k, n_known))
    order = np.argsort(np.log1p(known_counts), kind="stable")
    sorted_log = np.log1p(known_counts)[order]
    pos = np.searchsorted(sorted_log, np.log1p(new_counts))
    start = np.clip(pos - k // 2, 0, n_known - k)
    return order[start[:, None] + np.arange(k)[None, :]]  # [n_new, k]


def _catalogue_keyed(catalogue: pl.DataFrame, dtype: pl.DataType, *columns: str | pl.Expr) -> pl.DataFrame:
    """The catalogue with ``item_id`` cast to the vocabulary's id type (so it joins with the vocabulary;
    an id that does not cast becomes null) and, when ``columns`` are given, only those besides it."""
    keyed = catalogue.with_columns(pl.col(ITEM_ID).cast(dtype, strict=False))
    return keyed.select(ITEM_ID, *columns) if columns else keyed


def _per_vocab_item(vocab: Vocab, catalogue: pl.DataFrame, *columns: str) -> pl.DataFrame:
    """``columns`` of the catalogue row of every vocabulary item, row for row with the vocabulary
    (``item_id`` first; nulls for items the catalogue does not list)."""
    cat = _catalogue_keyed(catalogue, vocab.item_ids.dtype, *columns).unique(ITEM_ID, keep="first")
    return vocab.frame.select(ITEM_ID).join(cat, on=ITEM_ID, how="left", maintain_order="left")


RATE_LINE_MIN_TITLES = 5  # known titles of a kind needed to draw its rate line
RATE_LINE_VIEWERS = 2048  # sequences whose mean final state stands for "a viewer" in rate_line_bias
MIN_GROUP = 5  # recent releases a genre needs for its own median; fewer: the kind's median


def item_rates(frame: pl.DataFrame, vocab: Vocab, cutoff: datetime, days: float,
               catalogue: pl.DataFrame | None) -> tuple[np.ndarray, np.ndarray]:
    """Plays per day of every item over the ``days`` before ``cutoff``, counted over the days it was
    available: (rate [n_items], available days [n_items]).

    Why: a film released the day before the cutoff has one day of plays where an old film has ``days``;
    comparing counts would rank it ``days`` times too low. An item is available from its catalogue
    release date, else from the day of its first play (only events before the cutoff are read). A title
    out for at most a day with no plays yet gets the early rate of recent releases of its kind
    (:func:`_release_day_rates`).
    """
    start = cutoff - timedelta(days=days)
    plays = frame.select(pl.col(ITEMS).explode().alias(ITEM_ID), pl.col(ITEM_TS).explode().alias("_ts"))
    idx = vocab.index_of(plays[ITEM_ID])
    ts = plays["_ts"].dt.replace_time_zone(None).dt.replace_time_zone("UTC") if plays["_ts"].dtype.time_zone \
        is None else plays["_ts"]
    in_window = ((ts >= start) & (ts < cutoff)).to_numpy() & (idx >= 0)
    counts = np.bincount(idx[in_window], minlength=len(vocab)).astype(np.float64)  # [n_items]
    first = (pl.DataFrame({"i": idx, "t": ts}).filter(pl.col("i") >= 0).group_by("i").agg(pl.col("t").min()))
    since = np.full(len(vocab), np.datetime64(start.replace(tzinfo=None), "us"))  # unknown: the whole window
    since[first["i"].to_numpy()] = first["t"].dt.replace_time_zone(None).dt.truncate("1d").to_numpy()
    if catalogue is not None and "release_date" in catalogue.columns:
        cat = _catalogue_keyed(catalogue, vocab.item_ids.dtype, "release_date")
        cat = cat.drop_nulls()
        at = vocab.index_of(cat[ITEM_ID])
        keep = at >= 0
        since[at[keep]] = cat["release_date"].cast(pl.Datetime("us")).to_numpy()[keep]
    start_np = np.datetime64(start.replace(tzinfo=None), "us")
    cut_np = np.datetime64(cutoff.replace(tzinfo=None), "us")
    avail = (cut_np - np.maximum(since, start_np)) / np.timedelta64(1, "D")  # [n_items] days
    avail = np.clip(avail, 1.0, days)  # an item released on the cutoff day: one day, zero plays
    rates = counts / avail
    if catalogue is not None and {"release_date", "kind"} <= set(catalogue.columns):
        rates = _release_day_rates(rates, counts, avail, vocab, catalogue, cutoff, days)
    return rates, avail


def _release_day_rates(rates: np.ndarray, counts: np.ndarray, avail: np.ndarray, vocab: Vocab,
                       catalogue: pl.DataFrame, cutoff: datetime, days: float) -> np.ndarray:
    """``rates`` with every unplayed title the catalogue has out for at most one day set to the median
    plays per available day of the played titles of its kind (and genre, where it has at least
    :data:`MIN_GROUP` of them) released within the window.

    Why: a title out today has had no time to be played; a rate of 0 would give it the rows of the
    genre's least-played titles, which never reach a list. The catalogue knows it is out, and the
    recent releases of its kind say how a fresh title is usually played (events before the cutoff only).
    """
    cat = _catalogue_keyed(catalogue, vocab.item_ids.dtype, "release_date", "kind",
                           (pl.col("genre") if "genre" in catalogue.columns else pl.lit(None)).alias("genre"))
    cat = cat.drop_nulls([ITEM_ID, "release_date"]).unique(ITEM_ID, keep="first")
    cat = cat.filter(pl.col("release_date").cast(pl.Datetime("us")) <= cutoff.replace(tzinfo=None))
    at = vocab.index_of(cat[ITEM_ID])
    cat = cat.filter(pl.Series(at >= 0)).with_columns(_i=pl.Series(at[at >= 0]).cast(pl.Int64))
    i = cat["_i"].to_numpy()
    cat = cat.with_columns(_rate=pl.Series(rates[i]), _fresh=pl.Series((counts[i] == 0) & (avail[i] <= 1.0)),
                           _recent=pl.Series((counts[i] > 0) & (avail[i] < days)))
    fresh = cat.filter("_fresh")
    if not fresh.height:
        return rates
    recent = cat.filter("_recent")
    by_kind = recent.group_by("kind").agg(_k=pl.col("_rate").median())
    by_genre = recent.group_by("kind", "genre").agg(_g=pl.col("_rate").median(), _n=pl.len())
    fresh = fresh.join(by_kind, on="kind", how="left").join(by_genre, on=["kind", "genre"], how="left",
                                                            nulls_equal=True)
    prior = fresh.select(pl.when(pl.col("_n") >= MIN_GROUP).then("_g").otherwise("_k").fill_null(0.0))
    out = rates.copy()
    out[fresh["_i"].to_numpy()] = prior.to_series().to_numpy()
    return out


def init_new_rows(
    state: dict[str, torch.Tensor], parent_vocab: Vocab, vocab: Vocab, window_counts: np.ndarray,
    catalogue: pl.DataFrame | None, neighbours: int, mature: np.ndarray | None = None,
) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """A state dict for ``vocab`` (a grown ``parent_vocab``): old rows copied, new rows initialised.

    ``window_counts`` [len(vocab)]: recent popularity of every item (events in the new window, or plays
    per available day, :func:`item_rates`). ``mature`` [len(vocab)] (optional): the known items available
    over the whole window, the only ones a new item is compared with. Returns the state and the init
    source of every new item (index into :data:`INIT_SOURCES`).
    """
    n_old, n_new = len(parent_vocab), len(vocab) - len(parent_vocab)
    tables = {k: state[k].float() for k in ROW_TABLES if k in state and state[k] is not None}
    bias = state["item_bias"].float()  # [n_old]
    ref = np.flatnonzero(mature[:n_old]) if mature is not None and mature[:n_old].any() else np.arange(n_old)
    near = ref[_popularity_neighbours(window_counts[ref], window_counts[n_old:], neighbours)]  # [n_new, k]
    near_t = torch.from_numpy(near)
    new_rows = {name: t[near_t].mean(dim=1) for name, t in tables.items()}  # [n_new, D] popularity mean
    new_bias = bias[near_t].mean(dim=1)  # [n_new]
    source = np.full(n_new, INIT_SOURCES.index("popularity"), dtype=np.int64)
    if catalogue is not None and n_new:
        cat = _catalogue_keyed(catalogue, vocab.item_ids.dtype)
        known = parent_vocab.frame.select(ITEM_ID, IDX).join(cat, on=ITEM_ID, how="inner")
        new = vocab.frame.slice(n_old).select(ITEM_ID).join(cat, on=ITEM_ID, how="left",
                                                             maintain_order="left")
        # genre + kind first, then series over it: the more specific group wins
        with_bias = {**tables, "item_bias": bias[:, None]}  # [n_old, 1]: averaged like a row
        for name, keys in (("genre", ["genre", "kind"]), ("series", ["series_id"])):
            if name == "genre" and mature is not None:  # the genre's titles of nearest plays per day
                ref_known = known.filter(pl.Series(mature[known[IDX].cast(pl.Int64).to_numpy()]))
                has, rows = _group_neighbour_rows(with_bias, ref_known, new, keys, window_counts,
                                                  window_counts[n_old:], neighbours)
                if has.any():
                    new_bias[torch.from_numpy(has)] = rows["item_bias"][torch.from_numpy(has), 0]
            else:
                has, rows = _group_mean_rows(with_bias, known, new, keys)
            if has.any():
                mask = torch.from_numpy(has)
                for t in new_rows:
                    new_rows[t][mask] = rows[t][mask]
                if name == "series":  # episodes of one series share their audience: and its popularity
                    new_bias[mask] = rows["item_bias"][mask, 0]
                source[has] = INIT_SOURCES.index(name)
    out = dict(state)
    for name in tables:
        out[name] = torch.cat([state[name], new_rows[name].to(state[name].dtype)])  # [n_old + n_new, D]
    out["item_bias"] = torch.cat([state["item_bias"], new_bias.to(state["item_bias"].dtype)])  # [n]
    return out, source


def refresh_young_rows(state: dict[str, torch.Tensor], vocab: Vocab, rates: np.ndarray, mature: np.ndarray,
                       young: np.ndarray, catalogue: pl.DataFrame | None, neighbours: int,
                       ) -> dict[str, torch.Tensor]:
    """``state`` with every ``young`` item's rows and bias replaced by those of the ``neighbours``
    ``mature`` items of its genre and kind (all of them without a catalogue) of nearest plays per day.

    Why: a model learns an item from its count over the whole training data, so a title released a few
    days ago looks unpopular however hot it is, and a short pass over one day of plays moves its rows
    the wrong way; the titles as hot as it is over a whole window are the best guess of where it belongs.
    """
    ref = mature & ~young
    if not ref.any() or not young.any():
        return state
    tables = {k: state[k].float() for k in ROW_TABLES if k in state and state[k] is not None}
    tables["item_bias"] = state["item_bias"].float()[:, None]  # [n, 1]: averaged like a row
    frame = vocab.frame.select(ITEM_ID, IDX)
    keys = ["_all"]
    if catalogue is not None and {"genre", "kind"} <= set(catalogue.columns):
        frame = frame.hstack(_per_vocab_item(vocab, catalogue, "genre", "kind").drop(ITEM_ID))
        keys = ["genre", "kind"]
    frame = frame.with_columns(_all=pl.lit(0))
    todo = np.flatnonzero(young)
    has, rows = _group_neighbour_rows(tables, frame.filter(pl.Series(ref)), frame[todo.tolist()], keys, rates,
                                      rates[todo], neighbours)
    out = dict(state)
    at = torch.from_numpy(todo[has])
    for name in tables:
        table = (out[name] if name != "item_bias" else out[name][:, None]).clone()
        table[at] = rows[name][torch.from_numpy(has)].to(table.dtype)
        out[name] = table if name != "item_bias" else table[:, 0]
    return out


def mean_state(model: GRU4Rec, frame: pl.DataFrame, vocab: Vocab, n: int, seed: int,
               max_len: int = 50) -> torch.Tensor:
    """The mean final state of ``n`` sequences of ``frame`` drawn at random (the known items among their
    last ``max_len``): [H]. An item's mean score over viewers is ``row . mean_state + bias``."""
    device = next(model.parameters()).device
    pick = frame.select(USER_ID, ITEMS).sample(min(n, frame.height), seed=seed) if frame.height else frame
    seqs = to_sequence_set(pick.with_columns(pl.col(ITEMS).list.tail(max_len)), vocab)  # known items only
    lengths = seqs.lengths  # [S]
    rows = np.flatnonzero(lengths)
    if not len(rows):
        return torch.zeros(model.item_out.shape[1], device=device)
    # [B, L] right-padded: sequence r's items at positions 0..len-1 (row_of is grouped by sequence)
    row_of = np.repeat(np.arange(len(lengths)), lengths)  # [P]
    position = np.arange(len(seqs.items)) - np.repeat(seqs.offsets[:-1], lengths)  # [P]
    items = torch.zeros(len(lengths), int(lengths.max()), dtype=torch.long)
    items[torch.from_numpy(row_of), torch.from_numpy(position)] = torch.from_numpy(seqs.items)
    items, lengths_t = items[torch.from_numpy(rows)], torch.from_numpy(lengths[rows])  # [B, L], [B]
    with torch.inference_mode():
        states = torch.cat([model.final_states(items[lo:lo + 1024].to(device), lengths_t[lo:lo + 1024])
                            for lo in range(0, len(rows), 1024)])  # [B, H]
    return states.float().mean(dim=0)  # [H]


def rate_line_bias(state: dict[str, torch.Tensor], vocab: Vocab, rates: np.ndarray, mature: np.ndarray,
                   young: np.ndarray, catalogue: pl.DataFrame | None, centre: torch.Tensor,
                   ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """``state`` with every ``young`` item's bias moved so that its mean score over viewers lies on the
    line that the ``mature`` items of its kind draw between their log plays per day and their mean score
    (a least-squares fit; ``centre`` [H] is the mean viewer state). Returns the state and each kind's slope.

    Why: a young title's rows are the mean of its neighbours', which sits at their mean popularity, and
    the hottest new releases are hotter than any known title of their genre (a film's plays are packed
    into the days since its release), so the nearest neighbours are all cooler than it; the line
    says how much higher the model scores a title that is played twice as often, and extends past them.
    """
    bias = state["item_bias"].detach().float().cpu().clone()  # [n] (the model may live on a GPU)
    mean_score = state["item_out"].detach().float().cpu() @ centre.float().cpu() + bias  # [n]
    kinds = np.zeros(len(vocab), dtype=np.int64)
    if catalogue is not None and "kind" in catalogue.columns:
        kind = _per_vocab_item(vocab, catalogue, "kind")["kind"]
        kinds = kind.fill_null("").rank("dense").cast(pl.Int64).to_numpy()
        kind_names = dict(zip(kinds.tolist(), kind.fill_null("").to_list(), strict=True))
    else:
        kind_names = {0: ""}
    slopes: dict[str, float] = {}
    log_rate = np.log(np.maximum(rates, 1e-3))
    for k, name in kind_names.items():
        ref = np.flatnonzero((kinds == k) & mature & ~young & (rates > 0))
        todo = np.flatnonzero((kinds == k) & young)
        if len(ref) < RATE_LINE_MIN_TITLES or not len(todo):
            continue
        x, y = log_rate[ref], mean_score[ref].numpy()
        slope, intercept = np.polyfit(x, y, 1) if np.ptp(x) > 1e-9 else (0.0, 0.0)  # one rate: no slope
        if slope <= 0:  # hotter never scores lower: a flat line at the known titles' mean score
            slope, intercept = 0.0, float(y.mean())
        target = intercept + slope * log_rate[todo]  # [t]
        at = torch.from_numpy(todo)
        bias[at] += torch.from_numpy(target).float() - mean_score[at]
        slopes[name or "all"] = round(slope, 4)
    out = dict(state)
    out["item_bias"] = bias.to(state["item_bias"].device, state["item_bias"].dtype)
    return out, slopes


def blend_with_parent(tuned: dict[str, torch.Tensor], parent: dict[str, torch.Tensor],
                      weight: float) -> dict[str, torch.Tensor]:
    """Weight-space average of every parameter the parent has (its rows only): ``weight * parent +
    (1 - weight) * tuned``; the new items' rows stay as tuned. Keeps old items close to the parent."""
    out = dict(tuned)
    for key, old in parent.items():
        new = tuned[key]
        old = old.to(new.device, new.dtype)
        if key in (*ROW_TABLES, "item_bias"):  # [n_items, ...]: the parent has the first n_old rows
            n = old.shape[0]
            out[key] = torch.cat([weight * old + (1 - weight) * new[:n], new[n:]])
        else:
            out[key] = weight * old + (1 - weight) * new
    return out


# --- the update's training data ---------------------------------------------------------------------


def split_cutoff(split_dir: Path, frame: pl.DataFrame) -> datetime:
    """The split's test cutoff (``stats.json``), else just after the latest event of train + valid."""
    from recsys.data.stats import read_json

    stats = read_json(split_dir / STATS_FILE) or {}
    if cut := stats.get("test_cutoff"):
        t = datetime.fromisoformat(cut)
        return t if t.tzinfo else t.replace(tzinfo=UTC)
    latest = frame[END_TS].max()
    return (latest if latest.tzinfo else latest.replace(tzinfo=UTC)) + timedelta(microseconds=1)


def read_update_sequences(split_dir: Path) -> pl.DataFrame:
    """Every sequence as far as the validation split sees it (events before the test cutoff), with times."""
    train_path, valid_path = split_dir / TRAIN_FILE, split_dir / VALID_FILE
    for path in (train_path, valid_path):
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run the split stage first")
    names = set(pl.read_parquet_schema(train_path)) & set(pl.read_parquet_schema(valid_path))
    key = SESSION_ID if SESSION_ID in names else USER_ID
    columns = list(dict.fromkeys([key, USER_ID, END_TS, ITEMS, ITEM_TS]))
    train = pl.read_parquet(train_path, columns=columns)
    valid = pl.read_parquet(valid_path, columns=columns)
    return pl.concat([valid, train.join(valid.select(key), on=key, how="anti")])


def select_update_data(frame: pl.DataFrame, window_start: datetime, replay_fraction: float,
                       context_events: int, seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(new, replay) sequences: those ending in the window (cut to the window plus ``context_events``
    earlier events), and a seeded random sample of the older ones making ``replay_fraction`` of the pass."""
    in_window = pl.col(END_TS) >= window_start
    n_before = pl.col(ITEM_TS).list.eval(pl.element() < window_start).list.sum().cast(pl.Int64)
    new = (frame.filter(in_window)
           .with_columns(_skip=(n_before - context_events).clip(lower_bound=0))
           .with_columns(pl.col(ITEMS, ITEM_TS).list.slice(pl.col("_skip")))
           .drop("_skip")
           .filter(pl.col(ITEMS).list.len() >= 2))
    old = frame.filter(~in_window)
    n_replay = 0
    if replay_fraction > 0 and new.height:
        n_replay = min(old.height, round(new.height * replay_fraction / (1 - replay_fraction)))
    replay = old.sample(n_replay, seed=seed) if n_replay else old.head(0)
    return new, replay


def to_sequence_set(frame: pl.DataFrame, vocab: Vocab) -> SequenceSet:
    """Rows of item lists -> flat vocabulary indices, every position trainable; unknown items removed."""
    lengths = frame[ITEMS].list.len().cast(pl.Int64).to_numpy()
    idx = vocab.index_of(frame[ITEMS].explode())
    seq_of = np.repeat(np.arange(frame.height), lengths)
    known = idx >= 0
    new_lengths = np.bincount(seq_of[known], minlength=frame.height).astype(np.int64)
    offsets = np.zeros(frame.height + 1, dtype=np.int64)
    np.cumsum(new_lengths, out=offsets[1:])
    return SequenceSet(items=idx[known].astype(np.int64), offsets=offsets,
                       n_context=np.zeros(frame.height, dtype=np.int64), user_ids=frame[USER_ID],
                       dropped={"unknown_items": int((~known).sum())})


def released_items(catalogue: pl.DataFrame | None, start: date, until: date) -> pl.Series | None:
    """Catalogue items released in ``[start, until]`` (new titles, watched or not yet)."""
    if catalogue is None or "release_date" not in catalogue.columns:
        return None
    released = catalogue.filter(pl.col("release_date").is_between(start, until))
    return released[ITEM_ID]


def series_siblings(catalogue: pl.DataFrame | None, known: pl.Series, until: date) -> pl.Series | None:
    """Catalogue episodes released by ``until`` (or undated) of every series one of ``known`` belongs to.

    Why: the continuation rule (recsys.model.policy) can only serve an episode the model knows, and a
    viewer's history maps onto the vocabulary; an episode nobody has played yet (or played only in a
    one-event session) would otherwise break the chain from the latest watched episode to the next one.
    """
    if catalogue is None or not {"series_id", "episode"} <= set(catalogue.columns):
        return None
    cat = _catalogue_keyed(catalogue, known.dtype)
    series = cat.filter(pl.col(ITEM_ID).is_in(known.implode()))["series_id"].drop_nulls().unique()
    episodes = cat.filter(pl.col("series_id").is_in(series.implode()))
    if "release_date" in cat.columns:
        episodes = episodes.filter(pl.col("release_date").is_null() | (pl.col("release_date") <= until))
    return episodes.sort(episode_order(cat.columns))[ITEM_ID]


# --- the update ---------------------------------------------------------------------------------------


def _young_items(vocab: Vocab, mature: np.ndarray, catalogue: pl.DataFrame | None) -> np.ndarray:
    """Items available for less than the window, other than episodes of a series with a mature item
    (those share their series' bias): [n_items] bool."""
    young = ~mature
    if catalogue is not None and "series_id" in catalogue.columns:
        series = _per_vocab_item(vocab, catalogue, "series_id")["series_id"]
        old_series = series.filter(pl.Series(mature)).drop_nulls().unique()
        young &= ~series.is_in(old_series.implode()).fill_null(False).to_numpy()
    return young


def _grown_model(parent: Checkpoint, vocab: Vocab, window_counts: np.ndarray, catalogue: pl.DataFrame | None,
                 neighbours: int, mature: np.ndarray | None = None) -> tuple[GRU4Rec, dict[str, int]]:
    state, source = init_new_rows(parent.model_state, parent.vocab, vocab, window_counts, catalogue,
                                  neighbours, mature)
    model = GRU4Rec(len(vocab), parent.config.model)
    model.load_state_dict(state)
    sources = {name: int((source == i).sum()) for i, name in enumerate(INIT_SOURCES)}
    return model, sources


def update_checkpoint_dir(config: Config, parent_label: str, cutoff: datetime) -> Path:
    """``checkpoints/<update.run_name>/<parent>-<cutoff>``: one directory per (parent, data) pair."""
    slug = parent_label.replace("version ", "v").replace(" ", "_").replace("/", "_")
    return config.paths.checkpoints_dir / config.update.run_name / f"{slug}-{cutoff:%Y%m%dT%H%M%S}"


def update_model(config: Config, parent_checkpoint: Path, parent_label: str, split_dir: Path | None = None,
                 checkpoint_dir: Path | None = None, catalogue: pl.DataFrame | None = None,
                 as_of: date | None = None, resume: bool = True) -> UpdateResult:
    """Grow, initialise and warm-start ``parent_checkpoint`` on ``split_dir``; write ``updated.pt``.

    ``as_of`` is the last release date of catalogue items to add (default: the day after the cutoff).
    With ``resume`` a finished ``updated.pt`` is returned as is and a ``last.pt`` is continued.
    """
    t0 = time.perf_counter()
    ucfg = config.update
    split_dir = Path(split_dir) if split_dir is not None else config.paths.split_dir
    frame = read_update_sequences(split_dir)
    cutoff = split_cutoff(split_dir, frame)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else update_checkpoint_dir(
        config, parent_label, cutoff)
    out_path, last_path = checkpoint_dir / UPDATED, checkpoint_dir / LAST
    if resume and out_path.exists():
        done = load_checkpoint(out_path)
        log.info("update already finished: %s", out_path)
        return UpdateResult(**{**done.extra[LINEAGE_KEY], "checkpoint": out_path, "resumed": True})

    device = resolve_device(config.train.device, "train.device")
    parent = load_checkpoint(parent_checkpoint)
    window_start = cutoff - timedelta(days=ucfg.new_days)
    if parent_cut := (parent.extra.get(LINEAGE_KEY) or {}).get("events_up_to"):  # chained daily updates:
        window_start = max(window_start, datetime.fromisoformat(parent_cut))  # only what the parent missed
    new, replay = select_update_data(frame, window_start, ucfg.replay_fraction, ucfg.context_events,
                                     config.train.seed)
    candidates = [frame[ITEMS].explode()]
    if ucfg.use_catalogue and (released := released_items(
            catalogue, window_start.date(), as_of or (cutoff + timedelta(days=1)).date())) is not None:
        candidates.append(released.cast(parent.vocab.item_ids.dtype, strict=False))
    if ucfg.use_catalogue and (siblings := series_siblings(
            catalogue, pl.concat([parent.vocab.item_ids, *candidates]).drop_nulls(),
            as_of or (cutoff + timedelta(days=1)).date())) is not None:
        candidates.append(siblings)
    grown = grow_vocab(parent.vocab, pl.concat(candidates).drop_nulls())
    in_window = grown.index_of(new[ITEMS].explode())
    window_counts = np.bincount(in_window[in_window >= 0], minlength=len(grown))  # [n_items]
    vocab = grow_vocab(parent.vocab, grown.item_ids.slice(len(parent.vocab)), window_counts)
    rates, avail = item_rates(frame, vocab, cutoff, ucfg.new_days, catalogue)  # new_days, even when chained
    mature = avail >= ucfg.new_days
    young = _young_items(vocab, mature, catalogue) if ucfg.refresh_young else np.zeros(len(vocab), bool)
    model, sources = _grown_model(parent, vocab, rates if ucfg.rate_init else window_counts, catalogue,
                                  ucfg.neighbours, mature if ucfg.rate_init else None)
    log.info("vocabulary %d -> %d items (new rows from %s); %d new + %d replay sequences since %s",
             len(parent.vocab), len(vocab), sources, new.height, replay.height, window_start.isoformat())

    seqs = to_sequence_set(pl.concat([new.select(USER_ID, ITEMS), replay.select(USER_ID, ITEMS)]), vocab)
    train_cfg = parent.config.train.model_copy(update={
        "learning_rate": parent.config.train.learning_rate * ucfg.lr_scale, "epochs": ucfg.epochs,
        "seed": config.train.seed, "device": config.train.device, "threads": config.train.threads,
    })
    model = model.to(device)
    # the parent's rules, with the series structure rebuilt over the grown vocabulary (new episodes too)
    policy = replace(resolve_policy(config, vocab, split_dir), exclude=parent.policy.exclude,
                     continue_series=parent.policy.continue_series,
                     continuation_slots=parent.policy.continuation_slots,
                     partial_event_types=parent.policy.partial_event_types)
    # the sampler draws negatives from what the pass trains on (new items included), never from zero counts
    sample_counts = np.bincount(seqs.items, minlength=len(vocab)) + 1
    trainer = SessionParallelTrainer(model, train_cfg, sample_counts, device,
                                     mask_seen=resolve_mask_seen(config, policy))
    lineage = {"parent": parent_label, "events_up_to": cutoff.isoformat(),
               "n_parent_items": len(parent.vocab), "n_items": len(vocab), "init_sources": sources,
               "new_sequences": new.height, "replay_sequences": replay.height}
    saved_config = config.model_copy(update={"model": parent.config.model})
    history: list[dict[str, Any]] = []
    first_epoch, resumed = 1, False
    if resume and last_path.exists():
        ckpt = load_checkpoint(last_path, map_location=device)
        if ckpt.n_items != len(vocab) or ckpt.extra.get("parent") != parent_label:
            raise ValueError(f"{last_path} belongs to another update (parent {ckpt.extra.get('parent')}, "
                             f"{ckpt.n_items} items): remove {checkpoint_dir} to start afresh")
        model.load_state_dict(ckpt.model_state)
        trainer.load_state_dict(ckpt.optimizer_state)
        set_rng_state(ckpt.extra["rng"], device)
        history, first_epoch, resumed = list(ckpt.extra["history"]), ckpt.epoch + 1, True
        log.info("resuming update %s after epoch %d", checkpoint_dir, ckpt.epoch)
    for epoch in range(first_epoch, ucfg.epochs + 1):
        loss, n_events, seconds = run_epoch(trainer, seqs, train_cfg, epoch, device)
        history.append({"epoch": epoch, "train_loss": loss, "epoch_seconds": seconds,
                        "events_per_second": n_events / max(seconds, 1e-9)})
        log.info("update epoch %d/%d: loss %.4f, %d events in %.1f s", epoch, ucfg.epochs, loss, n_events,
                 seconds)
        save_checkpoint(last_path, model=model, optimizer=trainer, config=saved_config, vocab=vocab,
                        epoch=epoch,
                        metrics={"train_loss": loss},
                        extra={"rng": rng_state(device), "history": history, "parent": parent_label},
                        policy=policy)
    if ucfg.parent_weight > 0:
        model.load_state_dict(blend_with_parent(model.state_dict(), parent.model_state, ucfg.parent_weight))
    if young.any():  # after the pass and the blend, which both pull a fresh title back towards its count
        state = model.state_dict()
        state = refresh_young_rows(state, vocab, rates, mature, young, catalogue, ucfg.neighbours)
        if ucfg.rate_line:
            centre = mean_state(model, new, vocab, RATE_LINE_VIEWERS, config.train.seed)
            state, slopes = rate_line_bias(state, vocab, rates, mature, young, catalogue, centre)
            log.info("young titles on the score-vs-log-rate line of their kind (slopes %s)", slopes)
        model.load_state_dict(state)
    seconds = time.perf_counter() - t0
    lineage.update(history=history, seconds=round(seconds, 3))
    save_checkpoint(out_path, model=model, optimizer=None, config=saved_config, vocab=vocab,
                    epoch=ucfg.epochs,
                    metrics={"train_loss": history[-1]["train_loss"] if history else float("nan")},
                    extra={LINEAGE_KEY: lineage, "history": history}, policy=policy)
    return UpdateResult(checkpoint=out_path, resumed=resumed, **lineage)
