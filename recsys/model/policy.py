"""One recommendation policy: what may be recommended given what a viewer already watched.

Defined once (config ``policy``), resolved when a model is trained against how the split's sequences were
built (its ``stats.json``) and the item catalogue, stored in the checkpoint (so in the pyfunc too), and
applied by :func:`apply_policy` to the scores of validation, evaluation, the promotion gate, batch scoring
and the pyfunc alike. Training negatives follow it through :func:`resolve_mask_seen`.

Rules (``exclude``):
- ``all``: every item in the history is excluded (rating logs: everything rated was seen);
- ``completed``: items watched to the end are excluded; an unfinished watch (``event_type`` in
  ``partial_event_types``) may be resumed. Histories without completion information count as completed;
- ``none``: nothing is excluded; a model with ``model.history_bias`` adds its learned offset to history
  items instead.
With ``continue_series``, the episode after the most recently watched episode of each series in the
history is always eligible, even if it was watched before: a viewer re-watching a series continues from
where they are. ``continuation_slots`` N > 0 goes further: the continuations of the N most recently
watched series are placed at the top of the list (most recent series first), whatever the model scores
them. Why: a newly released episode has no trained row yet (a model learns an item only from its plays),
but the catalogue says it is what a viewer of its series watches next, so the rule serves it the day it
is released; for known episodes the model mostly ranks them there anyway.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import torch

from recsys.data.catalogue import episode_order
from recsys.data.vocab import Vocab
from recsys.schemas import ITEM_ID, STATS_FILE

if TYPE_CHECKING:
    from recsys.config import Config

log = logging.getLogger(__name__)

EXCLUDE_MODES = ("none", "completed", "all")
CATALOGUE_FILE = "catalogue.parquet"
SERIES_COLUMNS = ("series_id", "episode")  # required catalogue columns besides item_id (season optional)
# continuation slots a model gets at training when policy.continuation_slots is null (measured in
# benchmarks/bench_freshness.py on validation days: docs/freshness.md)
DEFAULT_CONTINUATION_SLOTS = 6


class PolicyMismatchError(ValueError):
    """A model is about to be evaluated or served under rules other than the ones it was trained with."""


@dataclass(frozen=True)
class Policy:
    """Resolved rules plus the series structure over one vocabulary (arrays indexed by item index)."""

    exclude: str = "none"
    continue_series: bool = False
    partial_event_types: tuple[str, ...] = ("partial",)
    continuation_slots: int = 0  # the continuations of this many latest series lead the list
    next_item: np.ndarray | None = None  # [n_items] index of the episode after each episode, -1: none
    series: np.ndarray | None = None  # [n_items] series code of each episode, -1: not an episode
    source: dict[str, Any] = field(default_factory=dict)  # how it was resolved (sessions mode, catalogue)

    def __post_init__(self) -> None:
        if self.exclude not in EXCLUDE_MODES:
            raise ValueError(f"policy exclude must be one of {EXCLUDE_MODES}, got {self.exclude!r}")
        if self.continuation_slots < 0:
            raise ValueError(f"policy continuation_slots must be >= 0, got {self.continuation_slots}")

    @property
    def continues(self) -> bool:
        """Series continuation is in effect (asked for, and the catalogue gave series structure)."""
        return bool(self.continue_series and self.next_item is not None)

    @property
    def rules(self) -> dict[str, Any]:
        """What decides a ranking: two policies with equal rules rank identically."""
        return {"exclude": self.exclude, "continue_series": self.continues,
                "continuation_slots": self.slots, "partial_event_types": list(self.partial_event_types)}

    @property
    def slots(self) -> int:
        """Continuation slots in effect (0 without series continuation)."""
        return self.continuation_slots if self.continues else 0

    def describe(self) -> str:
        episodes = int((self.next_item >= 0).sum()) if self.continues else 0
        series = f"on ({episodes:,} episodes with a successor)" if self.continues else "off"
        return f"exclude={self.exclude}, continue_series={series}, continuation_slots={self.slots}"

    def to_plain(self) -> dict[str, Any]:
        """Tensors, lists and strings only: loads with ``torch.load(weights_only=True)``."""
        return {
            "exclude": self.exclude, "continue_series": bool(self.continue_series),
            "partial_event_types": list(self.partial_event_types),
            "continuation_slots": int(self.continuation_slots),
            "next_item": _plain_array(self.next_item),
            "series": _plain_array(self.series),
            "source": json.dumps(self.source, default=str),
        }

    @classmethod
    def from_plain(cls, data: dict[str, Any]) -> Policy:
        arrays = {k: None if data.get(k) is None else data[k].numpy().astype(np.int64)
                  for k in ("next_item", "series")}
        return cls(exclude=data["exclude"], continue_series=bool(data["continue_series"]),
                   partial_event_types=tuple(data.get("partial_event_types") or ("partial",)),
                   continuation_slots=int(data.get("continuation_slots", 0)),  # older models: none
                   source=json.loads(data.get("source") or "{}"), **arrays)

    @classmethod
    def masking(cls, exclude_seen: bool) -> Policy:
        """Plain history masking on or off, without series: the shorthand of low-level callers."""
        return cls(exclude="all" if exclude_seen else "none")


def _plain_array(values: np.ndarray | None) -> torch.Tensor | None:
    return None if values is None else torch.from_numpy(values.astype(np.int32))


def continuation_pairs(
    rows: torch.Tensor, cols: torch.Tensor, policy: Policy
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, item) of the episode after the latest watched episode of every series in each row's history.

    ``rows``/``cols`` [P] are history pairs grouped by row and time-ordered within a row (every caller
    builds them so). Empty when series continuation is off.
    """
    r, c, _ = _continuations(rows, cols, policy)
    return r, c


def _continuations(
    rows: torch.Tensor, cols: torch.Tensor, policy: Policy
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`continuation_pairs` plus each pair's recency [K]: 0 for the row's most recently watched
    series, 1 for the one before, ..."""
    empty = rows[:0], cols[:0], rows[:0]
    if not policy.continues or rows.numel() == 0:
        return empty
    series = torch.as_tensor(policy.series, device=cols.device)[cols]  # [P]
    episode = series >= 0
    r, c, s = rows[episode], cols[episode], series[episode]
    if r.numel() == 0:
        return empty
    key = r * (int(policy.series.max()) + 1) + s  # one key per (row, series)
    uniq, inverse = torch.unique(key, return_inverse=True)
    position = torch.arange(len(key), device=key.device)
    last = torch.zeros(len(uniq), dtype=torch.long, device=key.device).scatter_reduce(
        0, inverse, position, "amax", include_self=False)  # [K] latest pair of each (row, series)
    nxt = torch.as_tensor(policy.next_item, device=cols.device)[c[last]]  # [K]
    keep = nxt >= 0
    r, nxt, last = r[last][keep], nxt[keep], last[keep]
    # recency within the row: order by (row, latest position descending), count from each row's start
    order = torch.argsort(r * (len(key) + 1) + (len(key) - last))
    r, nxt = r[order], nxt[order]
    first = torch.ones_like(r, dtype=torch.bool)
    first[1:] = r[1:] != r[:-1]
    start = torch.cummax(torch.where(first, torch.arange(len(r), device=r.device), 0), dim=0).values
    return r, nxt, torch.arange(len(r), device=r.device) - start


def apply_policy(
    scores: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    policy: Policy,
    *,
    completed: torch.Tensor | None = None,
    history_bias: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any] | None = None,
) -> torch.Tensor:
    """Apply ``policy`` to ``scores`` [b, n_items] in place, given the history pairs ``rows``/``cols`` [P];
    returns how many items the continuation slots put at the head of each row [b] (exports mark them).

    ``completed`` [P] bool says which watches were finished (None: all were). Pairs not excluded get the
    model's ``history_bias`` (when given); excluded ones -inf; the continuation episodes then get their
    plain score back, whatever the history said about them; with ``continuation_slots`` N the ones of the
    N latest series then score above everything else in their row (most recent series highest: the row's
    best score plus N, N-1, ... steps of ``max(1, |best|)``). An episode the caller already scored -inf
    (an excluded title) stays out: the rule never brings back what the scores ruled out.
    """
    placed = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)  # [b]
    if rows.numel() == 0:
        return placed
    keep_rows, keep_cols, recency = _continuations(rows, cols, policy)
    saved = scores[keep_rows, keep_cols].clone()  # [K]
    if policy.exclude == "completed" and completed is not None:
        masked = completed.to(rows.device)
    elif policy.exclude in ("all", "completed"):
        masked = torch.ones_like(rows, dtype=torch.bool)
    else:
        masked = torch.zeros_like(rows, dtype=torch.bool)
    if history_bias is not None and not bool(masked.all()):
        history_bias(scores, rows[~masked], cols[~masked])
    if bool(masked.any()):
        scores[rows[masked], cols[masked]] = -math.inf
    if keep_rows.numel():
        scores[keep_rows, keep_cols] = saved
    slot = (recency < policy.slots) & torch.isfinite(saved)  # [K]
    if bool(slot.any()):
        finite = torch.where(torch.isfinite(scores), scores, torch.finfo(scores.dtype).min)
        top = finite.max(dim=1).values  # [b] the row's best score before the slots
        step = top.abs().clamp(min=1)  # [b] a step that survives bfloat16 rounding at any magnitude
        r = keep_rows[slot]
        scores[r, keep_cols[slot]] = top[r] + (policy.slots - recency[slot]).to(scores.dtype) * step[r]
        placed = torch.bincount(r, minlength=scores.shape[0])  # one next episode per (row, series)
    return placed


def excluded_pairs(rows: np.ndarray, cols: np.ndarray, policy: Policy,
                   completed: np.ndarray | None = None) -> np.ndarray:
    """Bool [P]: which history pairs ``policy`` keeps out of the lists (for export checks)."""
    if policy.exclude == "none":
        out = np.zeros(len(rows), dtype=bool)
    elif policy.exclude == "completed" and completed is not None:
        out = completed.astype(bool).copy()
    else:
        out = np.ones(len(rows), dtype=bool)
    keep_rows, keep_cols = continuation_pairs(torch.from_numpy(rows), torch.from_numpy(cols), policy)
    if keep_rows.numel():
        width = int(max(cols.max(), keep_cols.max())) + 1
        protected = keep_rows.numpy() * width + keep_cols.numpy()
        out &= ~np.isin(rows.astype(np.int64) * width + cols, protected)
    return out


# --- resolution from config, split and catalogue ---------------------------------------------------


def split_record(split_dir: Path) -> dict[str, Any]:
    """How the split's sequences were built (``stats.json`` ``sequences_built``; older splits: inferred)."""
    path = Path(split_dir) / STATS_FILE
    if not path.is_file():
        return {}
    stats = json.loads(path.read_text())
    built = dict(stats.get("sequences_built") or {})
    if not built:  # a split written before the record existed
        mode = (stats.get("sessions_stage") or {}).get("mode")
        built = {"sessions": {"mode": mode} if mode else {}, "protocol": stats.get("protocol")}
    return built


def find_catalogue(config: Config) -> Path | None:
    """``policy.catalogue`` (relative: under ``paths.data_root``), else the newest catalogue under raw/."""
    explicit = config.policy.catalogue
    if explicit is not None:
        path = explicit if explicit.is_absolute() else config.paths.data_root / explicit
        if not path.is_file():
            raise FileNotFoundError(f"policy.catalogue {path} does not exist")
        return path
    raw = config.paths.raw_dir
    found = sorted(raw.glob(CATALOGUE_FILE)) + sorted(raw.glob(f"*/{CATALOGUE_FILE}")) if raw.is_dir() else []
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def series_arrays(catalogue: Path, vocab: Vocab) -> tuple[np.ndarray, np.ndarray] | None:
    """(series code [n], next episode index [n]) over ``vocab`` from a catalogue; None without series.

    Episodes missing from the vocabulary are skipped: the successor is the next episode the model knows.
    """
    columns = pl.read_parquet_schema(catalogue)
    if ITEM_ID not in columns or any(c not in columns for c in SERIES_COLUMNS):
        log.warning("%s has no %s columns: series continuation is off", catalogue, "/".join(SERIES_COLUMNS))
        return None
    wanted = [ITEM_ID, *SERIES_COLUMNS] + (["season"] if "season" in columns else [])
    cat = pl.read_parquet(catalogue, columns=wanted).filter(pl.col("series_id").is_not_null())
    idx = vocab.index_of(cat[ITEM_ID])
    cat = cat.with_columns(pl.Series("_idx", idx)).filter(pl.col("_idx") >= 0)
    cat = cat.sort(episode_order(wanted), nulls_last=True)
    n = len(vocab)
    series, next_item = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    if not cat.height:
        return series, next_item
    codes = cat["series_id"].rank("dense").cast(pl.Int64).to_numpy() - 1
    items = cat["_idx"].to_numpy()
    series[items] = codes
    same = codes[1:] == codes[:-1]
    next_item[items[:-1][same]] = items[1:][same]
    return series, next_item


def resolve_policy(config: Config, vocab: Vocab, split_dir: Path | None = None) -> Policy:
    """The policy a model trained now on ``split_dir`` gets: the config's rules, ``auto`` from the split."""
    pc = config.policy
    built = split_record(split_dir if split_dir is not None else config.paths.split_dir)
    mode = (built.get("sessions") or {}).get("mode")
    source: dict[str, Any] = {"sessions_mode": mode, "protocol": built.get("protocol")}
    exclude = pc.exclude
    if exclude == "auto":
        if mode is None:  # a split without its record (hand-made, or older than the record)
            mode = config.sessions.mode
            log.warning("the split has no record of how its sequences were built (stats.json): taking "
                        "sessions.mode=%s from the config for policy.exclude=auto", mode)
            source["sessions_mode"] = f"{mode} (config: the split has no record)"
        exclude = "all" if mode == "user" else "completed"
        source["exclude"] = f"auto from sessions.mode={mode}"
    next_item = series = None
    if pc.continue_series is not False:
        catalogue = find_catalogue(config)
        arrays = series_arrays(catalogue, vocab) if catalogue is not None else None
        if arrays is not None:
            series, next_item = arrays
            source["catalogue"] = str(catalogue)
        elif pc.continue_series:
            raise ValueError("policy.continue_series=true needs an item catalogue with series_id and episode "
                             "(policy.catalogue, or raw/*/catalogue.parquet)")
    slots = DEFAULT_CONTINUATION_SLOTS if pc.continuation_slots is None else pc.continuation_slots
    return Policy(exclude=exclude, continue_series=next_item is not None,
                  partial_event_types=tuple(pc.partial_event_types), continuation_slots=slots,
                  next_item=next_item, series=series, source=source)


def requested_rules(config: Config) -> dict[str, Any]:
    """The rules the config asks for explicitly (``auto``/None ask for nothing: the stored policy holds)."""
    pc = config.policy
    asked: dict[str, Any] = {}
    if pc.exclude != "auto":
        asked["exclude"] = pc.exclude
    if pc.continue_series is not None:
        asked["continue_series"] = pc.continue_series
    if pc.continuation_slots is not None:
        asked["continuation_slots"] = pc.continuation_slots
    return asked


def policy_for_model(stored: Policy, config: Config, vocab: Vocab, what: str) -> tuple[Policy, str | None]:
    """The policy to rank a stored model with, and the override note when the config changed it.

    A config asking for other rules than the model's is an error unless ``policy.override`` is set; the
    returned note (None when there is no override) is what callers record.
    """
    asked = requested_rules(config)
    differs = {k: v for k, v in asked.items() if stored.rules.get(k) != v}
    if not differs:
        return stored, None
    if not config.policy.override:
        wanted = ", ".join(f"{k}={v}" for k, v in differs.items())
        raise PolicyMismatchError(
            f"{what}: the model was trained and gated with policy {stored.describe()}; the config asks "
            f"for {wanted}. Set policy.override=true to rank it under other rules (recorded), or use "
            f"the defaults (policy.exclude=auto, policy.continue_series=null, "
            f"policy.continuation_slots=null)")
    new = replace(stored, exclude=differs.get("exclude", stored.exclude),
                  continuation_slots=differs.get("continuation_slots", stored.continuation_slots))
    if "continue_series" in differs:
        if differs["continue_series"] and stored.next_item is None:
            new = replace(resolve_policy(config, vocab), exclude=new.exclude)
        else:
            new = replace(new, continue_series=bool(differs["continue_series"]))
    note = f"policy override: model's {stored.describe()} -> {new.describe()}"
    log.warning("%s: %s", what, note)
    return new, note


def resolve_mask_seen(config: Config, policy: Policy) -> bool:
    """History items are not negatives when the policy excludes them all anyway and no learnt history
    bias needs them (the bias only gets a gradient from history items that are negatives).

    ``train.mask_seen_negatives`` set explicitly wins (an experiment setting).
    """
    if config.train.mask_seen_negatives is not None:
        return config.train.mask_seen_negatives
    return policy.exclude == "all" and not config.model.history_bias
