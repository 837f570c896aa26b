"""Batch scoring: every user's top-K next-watch list from a registered model, exported atomically.

Pipeline (no per-user Python loop anywhere):

1. histories  one polars scan + sort of the events (``recsys.serving.histories``) -> CSR index arrays;
2. encoding   users sorted by history length, ``user_batch_size`` at a time, right-padded into one
              [B, L] matrix (little padding thanks to the sort) -> ``model.final_states`` [B, H];
3. ranking    ``model.score_items`` on sub-batches of ``chunk_elements / n_items`` users (full catalogue,
              memory bounded by the chunk), already-watched and withdrawn items set to -inf, top-K by
              ``block_topk`` (same values as ``torch.topk``, ~2x faster on CPU);
4. export     long-format frame with original ids -> ``recsys.serving.export.publish_recs``
              (validate, atomic).

Users without a usable history (no events in the window, or only items the model does not know) get the
most-popular list (training counts; score = count), with the same exclusions, ``source = "popular"``.

Why user blocks against the whole catalogue rather than item chunks with a merged top-K: small blocks are
the fast case on CPU (64-128 users per block ran ~1.5x faster than 512-4096 at 20k items, and 128 was
best at 100k items too), they use the model's own ``score_items`` unchanged, and memory stays bounded by
``chunk_elements`` down to a single user's row. Item chunks would only matter if one row of scores
(4 bytes x n_items) did not fit in memory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from recsys.config import Config, recorded_config
from recsys.data.vocab import Vocab
from recsys.device import resolve_device
from recsys.model.policy import Policy, apply_policy, excluded_pairs, policy_for_model
from recsys.schemas import (
    ITEM_ID,
    MODEL_NAME,
    MODEL_VERSION,
    RANK,
    RUN_DATE,
    SCORE,
    SOURCE,
    USER_ID,
)
from recsys.serving.export import RecsChecks, publish_recs, snapshot_hash
from recsys.serving.histories import Histories, event_files, load_histories
from recsys.serving.monitoring import monitor_scored

log = logging.getLogger(__name__)

CPU_CHUNK_ROWS = 128  # users per score block on CPU: fastest at 20k and at 100k items (f32 and bf16)
CPU_CHUNK_ELEMENTS = 64_000_000  # ...unless the catalogue is so large that this bound (256 MB) is smaller
CUDA_CHUNK_ELEMENTS = 256_000_000
CPU_USER_BATCH = 1024
CUDA_USER_BATCH = 16384


@dataclass
class LoadedModel:
    model: torch.nn.Module
    vocab: Vocab
    policy: Policy
    uri: str
    name: str
    version: str
    run_id: str
    checkpoint_path: Path


def default_model_uri(config: Config) -> str:
    return f"models:/{config.tracking.registered_model}@champion"


def load_model(config: Config, model_uri: str, device: torch.device) -> LoadedModel:
    """Resolve a model URI (registry alias/version, run, or local checkpoint) and build it on ``device``."""
    from recsys.model.checkpoint import build_model, load_checkpoint
    from recsys.tracking.registry import resolve_model

    resolved = resolve_model(config, model_uri)
    path = Path(resolved.checkpoint_path)
    ckpt = load_checkpoint(path, map_location=device)
    # A local checkpoint or run artifact has no registry name/version: name it by where it came from and
    # version it by content, so the export still says exactly which weights produced it.
    name = resolved.name or ("run" if resolved.run_id else "local")
    version = str(resolved.version) or file_digest(path)[:12]
    return LoadedModel(
        model=build_model(ckpt, device),
        vocab=ckpt.vocab,
        policy=ckpt.policy,
        uri=resolved.uri,
        name=name,
        version=version,
        run_id=resolved.run_id,
        checkpoint_path=path,
    )


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- small readers ---------------------------------------------------------------------------------


def read_id_file(path: Path, column: str) -> pl.Series:
    """Ids from a text file (one per line) or a Parquet/CSV file with a ``column`` column."""
    path = Path(path)
    if path.suffix == ".parquet":
        return pl.read_parquet(path, columns=[column])[column]
    if path.suffix == ".csv":
        return pl.read_csv(path, columns=[column])[column]
    lines = [line.strip() for line in path.read_text().splitlines()]
    return pl.Series(column, [line for line in lines if line and not line.startswith("#")], dtype=pl.String)


def excluded_indices(vocab: Vocab, ids: pl.Series | None) -> tuple[np.ndarray, int]:
    """Vocabulary indices of the excluded item ids, and how many ids the vocabulary does not know."""
    if ids is None or not len(ids):
        return np.empty(0, dtype=np.int64), 0
    ids = ids.str.strip_chars() if ids.dtype == pl.String else ids
    idx = vocab.index_of(ids)
    return np.unique(idx[idx >= 0]), int((idx < 0).sum())


# --- ranking ---------------------------------------------------------------------------------------


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


class PhaseTimer:
    """Wall time per phase; synchronises CUDA so asynchronous kernels are charged to their phase.

    Also records the process's peak RSS at the end of each phase, to show which phase sets the peak.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.peak_rss_gb: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self.peak_rss_gb[name] = round(peak_rss_gb(), 3)


def padded_batch(hist: Histories, users: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded histories [B, L] (pad = item 0; the model is causal) and lengths [B]."""
    starts = hist.offsets[users]  # [B]
    lengths = hist.offsets[users + 1] - starts  # [B]
    width = max(int(lengths.max()), 1)
    cols = np.arange(width)
    pos = starts[:, None] + cols[None, :]  # [B, L]
    valid = cols[None, :] < lengths[:, None]  # [B, L]
    items = np.where(valid, hist.items[np.minimum(pos, max(len(hist.items) - 1, 0))], 0) if len(hist.items) \
        else np.zeros_like(pos)
    return torch.from_numpy(items), torch.from_numpy(lengths)


def seen_coordinates(hist: Histories, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row in ``users``, item index) of every item the users already watched, time-ordered per row."""
    rows, flat = _seen_positions(hist, users)
    return rows, hist.seen_items[flat]


def _seen_positions(hist: Histories, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row in ``users``, position in ``hist.seen_items``) of every watched event of the users."""
    starts = hist.seen_offsets[users]
    counts = hist.seen_offsets[users + 1] - starts
    rows = np.repeat(np.arange(len(users)), counts)
    first = np.repeat(starts - (np.cumsum(counts) - counts), counts)
    return rows, first + np.arange(len(rows))


TOPK_BLOCK = 64


def block_topk(scores: torch.Tensor, k: int, block: int = TOPK_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(scores, k, dim=1)`` in two cheap passes: same values (ties may pick other indices).

    The k best items lie in the k blocks (of ``block`` adjacent columns) with the largest maxima: any other
    block's items are beaten by k block maxima. So one max-reduction over the row (SIMD-friendly) plus a
    topk over k*block candidates replaces a selection over the whole row (~2x faster on CPU).
    """
    b, n = scores.shape
    n_blocks = n // block
    if n_blocks < 4 * k or not scores.is_contiguous():
        return torch.topk(scores, k, dim=1)
    maxima = torch.as_strided(scores, (b, n_blocks, block), (n, block, 1)).amax(dim=2)  # [b, n_blocks]
    best = torch.topk(maxima, k, dim=1).indices  # [b, k]
    cols = (best.unsqueeze(2) * block + torch.arange(block, device=scores.device)).reshape(b, k * block)
    if n_blocks * block < n:  # the ragged tail is always a candidate
        tail = torch.arange(n_blocks * block, n, device=scores.device).expand(b, -1)
        cols = torch.cat([cols, tail], dim=1)  # [b, k*block + tail]
    vals, pos = torch.topk(scores.gather(1, cols), k, dim=1)  # [b, k]
    return vals, cols.gather(1, pos)


@torch.no_grad()
def rank_users(
    score_fn: Callable[[int, int], torch.Tensor],
    hist: Histories,
    users: np.ndarray,
    *,
    n_items: int,
    top_k: int,
    policy: Policy,
    excluded: torch.Tensor,
    chunk_rows: int,
    out_idx: np.ndarray,
    out_score: np.ndarray,
    history_bias: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any] | None = None,
    out_placed: np.ndarray | None = None,
) -> None:
    """Top-K of ``score_fn(lo, hi)`` (scores [hi-lo, n_items] of ``users[lo:hi]``) under the model's
    ``policy`` (recsys.model.policy.apply_policy over everything each user watched), into ``out_*``;
    ``out_placed`` [n_users] (optional) gets how many of each list's first items the continuation slots
    placed there.

    ``history_bias(scores, rows, cols)`` is the model's learned repeat offset, applied by the policy to
    the watched (row, item) pairs it does not exclude.
    """
    device = excluded.device
    k = min(top_k, n_items)
    for lo in range(0, len(users), chunk_rows):
        chunk = users[lo : lo + chunk_rows]
        scores = score_fn(lo, lo + len(chunk))  # [b, n_items]
        if len(excluded):
            scores.index_fill_(1, excluded, -torch.inf)
        if policy.exclude != "none" or policy.continues or history_bias is not None:
            rows, flat = _seen_positions(hist, chunk)
            if len(rows):
                rows_t = torch.from_numpy(rows).to(device)
                cols_t = torch.from_numpy(hist.seen_items[flat]).to(device)
                done = None if hist.seen_completed is None else torch.from_numpy(hist.seen_completed[flat])
                placed = apply_policy(scores, rows_t, cols_t, policy, completed=done,
                                      history_bias=history_bias)  # [b]
                if out_placed is not None:
                    out_placed[chunk] = np.minimum(placed.cpu().numpy(), k)
        vals, idx = block_topk(scores, k)  # [b, k] sorted, -inf last
        out_idx[chunk, :k] = idx.cpu().numpy()
        out_score[chunk, :k] = vals.float().cpu().numpy()


def popularity_scores(vocab: Vocab, device: torch.device) -> torch.Tensor:
    """Training counts as scores [n_items] (float32; ties broken by the lower index by topk order)."""
    return torch.from_numpy(vocab.counts.astype(np.float32)).to(device)


# --- entry point -----------------------------------------------------------------------------------


def history_cutoff(run_date: date) -> datetime:
    """Histories include every event up to the end of ``run_date`` (UTC)."""
    return datetime.combine(run_date + timedelta(days=1), dtime(0), tzinfo=UTC)


def auto_threads() -> int:
    """Torch threads for the cores that are idle now (at least 1, at most torch's default).

    OpenMP threads spin-wait for each other; on a machine whose other processes already use the cores,
    two threads on 2 cores were measured 6x slower than one (benchmarks/bench_score.py, load ~7).
    """
    try:
        busy = os.getloadavg()[0]
    except OSError:
        return torch.get_num_threads()
    idle = (os.cpu_count() or 1) - int(busy + 0.5)
    return max(1, min(torch.get_num_threads(), idle))


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch CPU threads (None: ``auto_threads()``), restoring the previous number after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or auto_threads())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def score_users(
    config: Config,
    model_uri: str | None = None,
    run_date: date | None = None,
    users_file: Path | None = None,
    events_dir: Path | None = None,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """Score users and publish ``<out_dir>/recs/run_date=YYYY-MM-DD/``; returns the manifest.

    ``model_uri`` defaults to the champion alias of ``tracking.registered_model``; a local checkpoint
    path works too. ``out_dir`` defaults to ``paths.exports_dir``; ``events_dir`` to ``paths.events_dir``.
    ``users_file`` restricts scoring to those users (unknown ones get the popular list).
    """
    with torch_threads(config.score.threads), torch.inference_mode():
        return _score_users(config, model_uri, run_date, users_file, events_dir, out_dir)


def _score_users(
    config: Config,
    model_uri: str | None,
    run_date: date | None,
    users_file: Path | None,
    events_dir: Path | None,
    out_dir: Path | None,
) -> dict[str, Any]:
    sc = config.score
    run_date = run_date or datetime.now(UTC).date()
    model_uri = model_uri or default_model_uri(config)
    events_dir = Path(events_dir or config.paths.events_dir)
    out_dir = Path(out_dir or config.paths.exports_dir)
    device = resolve_device(sc.device, "score.device")
    timer = PhaseTimer(device)
    t_start = time.perf_counter()

    with timer("load_model_s"):
        loaded = load_model(config, model_uri, device)
    model, vocab = loaded.model, loaded.vocab
    n_items = len(vocab)
    # the policy the model was trained and gated with; other rules only on policy.override (recorded)
    policy, policy_override = policy_for_model(loaded.policy, config, vocab, f"scoring {loaded.uri}")

    with timer("history_s"):
        requested = read_id_file(users_file, USER_ID) if users_file is not None else None
        excl_ids = read_id_file(sc.exclude_items_file, ITEM_ID) if sc.exclude_items_file else None
        excl_idx, excl_unknown = excluded_indices(vocab, excl_ids)
        cutoff = history_cutoff(run_date)
        # watched items are excluded as the policy says; the ones it keeps get the learned repeat offset
        history_bias = model.add_history_bias if model.history_bias is not None else None
        uses_seen = policy.exclude != "none" or policy.continues or history_bias is not None
        hist = load_histories(
            events_dir, vocab, cutoff=cutoff, history_days=sc.history_days, max_history=sc.max_history,
            drop_repeats=config.sessions.drop_consecutive_repeats,
            with_seen=uses_seen, users=requested, partial_event_types=policy.partial_event_types,
        )

    n_users = hist.n_users
    if n_users == 0:
        raise ValueError(f"no events before {cutoff.isoformat()} under {events_dir}: no user to score "
                         "(wrong --run-date or events_dir?)")
    k = min(sc.top_k, n_items)
    out_idx = np.zeros((n_users, k), dtype=np.int32)  # [U, k] vocab indices
    out_score = np.full((n_users, k), -np.inf, dtype=np.float32)  # [U, k]
    out_placed = np.zeros(n_users, dtype=np.int64)  # [U] list heads placed by the continuation slots
    excluded = torch.from_numpy(excl_idx).to(device)
    if sc.chunk_elements:
        chunk_elements = sc.chunk_elements
    elif device.type == "cuda":
        chunk_elements = CUDA_CHUNK_ELEMENTS
    else:
        chunk_elements = min(CPU_CHUNK_ROWS * n_items, CPU_CHUNK_ELEMENTS)
    user_batch = sc.user_batch_size or (CUDA_USER_BATCH if device.type == "cuda" else CPU_USER_BATCH)
    chunk_rows = max(1, min(user_batch, chunk_elements // max(n_items, 1)))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=sc.precision == "bfloat16")
    lengths = hist.lengths
    with_history = np.flatnonzero(lengths > 0)
    order = with_history[np.argsort(-lengths[with_history], kind="stable")]  # longest first

    for lo in range(0, len(order), user_batch):
        batch = order[lo : lo + user_batch]
        with timer("encode_s"), autocast:
            items, lens = padded_batch(hist, batch)
            states = model.final_states(items.to(device), lens.to(device))  # [B, H]
        with timer("score_s"), autocast:
            rank_users(
                lambda lo, hi, states=states: model.score_items(states[lo:hi]),  # [b, n_items]
                hist, batch, n_items=n_items, top_k=k, policy=policy, excluded=excluded,
                chunk_rows=chunk_rows, out_idx=out_idx, out_score=out_score, history_bias=history_bias,
                out_placed=out_placed,
            )
        done = lo + len(batch)
        if done * 10 // len(order) > lo * 10 // len(order):  # every ~10%
            spent = timer.seconds.get("encode_s", 0.0) + timer.seconds["score_s"]
            log.info("scored %d/%d users (%.0f users/s, peak RSS %.2f GB)", done, len(order),
                     done / max(spent, 1e-9), peak_rss_gb())

    with timer("popular_s"):
        no_history = np.flatnonzero(lengths == 0)
        pop = popularity_scores(vocab, device)  # [n_items]
        if len(no_history):
            # users who watched nothing known share one list; the others get theirs masked individually
            seen_any = (hist.seen_offsets[no_history + 1] - hist.seen_offsets[no_history]) > 0
            if policy.exclude == "none" and not policy.continues:
                seen_any[:] = False
            shared, own = no_history[~seen_any], no_history[seen_any]
            for group, group_policy in ((shared[:1], Policy()), (own, policy)):
                if len(group):
                    rank_users(
                        lambda lo, hi: pop.unsqueeze(0).expand(hi - lo, n_items).clone(),  # [b, n_items]
                        hist, group, n_items=n_items, top_k=k, policy=group_policy, excluded=excluded,
                        chunk_rows=chunk_rows, out_idx=out_idx, out_score=out_score,
                    )
            if len(shared) > 1:
                out_idx[shared[1:]] = out_idx[shared[0]]
                out_score[shared[1:]] = out_score[shared[0]]

    with timer("assemble_s"):
        recs = assemble(hist, vocab, out_idx, out_score, lengths > 0, loaded, run_date, out_placed)

    counts = {
        **hist.counts,
        "users_scored": n_users,
        "users_model": int((lengths > 0).sum()),
        "users_popular": int((lengths == 0).sum()),
        "users_requested": int(requested.n_unique()) if requested is not None else None,
        "unknown_users": hist.counts.get("unknown_users", 0),
        "excluded_items": int(len(excl_idx)),
        "excluded_items_unknown": excl_unknown,
        "rows": recs.height,
    }
    files = event_files(events_dir, before=cutoff)
    extra_files = [p for p in (users_file, sc.exclude_items_file) if p is not None]
    manifest: dict[str, Any] = {
        "model": {
            "uri": loaded.uri, "requested_uri": model_uri, "name": loaded.name, "version": loaded.version,
            "run_id": loaded.run_id, "checkpoint": str(loaded.checkpoint_path),
        },
        "counts": counts,
        "input": {
            "events_dir": str(events_dir), "event_files": len(files),
            "snapshot_hash": snapshot_hash(files, extra_files),
            "users_file": str(users_file) if users_file else None,
            "exclude_items_file": str(sc.exclude_items_file) if sc.exclude_items_file else None,
            "history_cutoff": cutoff.isoformat(),
        },
        "top_k": sc.top_k,
        "policy": {**policy.rules, "override": policy_override},
        "device": str(device),
        "precision": sc.precision,
        "torch_threads": torch.get_num_threads(),
        "config": recorded_config(config),  # credentials redacted
        "timings": {name: round(s, 4) for name, s in timer.seconds.items()},
    }
    monitoring = monitor_scored(recs, vocab, excl_idx, counts, config=sc.monitoring, exports_dir=out_dir,
                                run_date=run_date)
    if monitoring is not None:  # written into _manifest.json; a failing export was refused above
        manifest["monitoring"] = monitoring
    checks = RecsChecks(
        top_k=sc.top_k,
        requested_users=hist.user_ids if requested is not None else None,
        excluded_items=excl_ids,
        seen=policy_excluded_pairs(hist, policy),
    )
    result = publish_recs(
        recs, exports_dir=out_dir, run_date=run_date, manifest=manifest, checks=checks,
        write_csv=sc.write_csv, write_wide=sc.write_wide, titles=catalogue_titles(config),
    )
    manifest["timings"].update({k: round(v, 4) for k, v in result.timings.items()})
    manifest["timings"]["total_s"] = round(time.perf_counter() - t_start, 4)
    manifest["peak_rss_gb_after"] = {**timer.peak_rss_gb, "publish": round(peak_rss_gb(), 3)}
    manifest["path"] = str(result.path)
    manifest["extra_paths"] = {k: str(v) for k, v in result.extra_paths.items()}
    manifest["run_date"] = run_date.isoformat()
    manifest["rows"] = recs.height
    log.info("scored %d users (%d popular) -> %s", n_users, counts["users_popular"], result.path)
    return manifest


def catalogue_titles(config: Config) -> pl.DataFrame | None:
    """``(item_id, title)`` for the exports' optional title column and every printed list: the ingested
    catalogue, else the one the recommendation policy reads (``policy.catalogue`` or the generator's
    ``raw/*/catalogue.parquet``), so a list shows titles whenever a catalogue exists."""
    from recsys.data.catalogue import load_catalogue, titles_frame
    from recsys.model.policy import find_catalogue

    catalogue = load_catalogue(config)
    if catalogue is None and (found := find_catalogue(config)) is not None and found.suffix == ".parquet":
        catalogue = pl.read_parquet(found)
    return titles_frame(catalogue)


def policy_excluded_pairs(hist: Histories, policy: Policy) -> pl.DataFrame | None:
    """(user_id, item_id) pairs the policy keeps out of every list: what the export check verifies."""
    if hist.seen_pairs is None or policy.exclude == "none":
        return None
    rows, flat = _seen_positions(hist, np.arange(hist.n_users))
    completed = hist.seen_completed[flat] if hist.seen_completed is not None else None
    keep_out = excluded_pairs(rows, hist.seen_items[flat], policy, completed)
    return hist.seen_pairs.filter(pl.Series(keep_out))


def assemble(
    hist: Histories,
    vocab: Vocab,
    out_idx: np.ndarray,
    out_score: np.ndarray,
    from_model: np.ndarray,
    loaded: LoadedModel,
    run_date: date,
    placed: np.ndarray | None = None,
) -> pl.DataFrame:
    """Long-format frame with original ids, ordered by user id then rank; slots left at -inf (catalogue
    exhausted by exclusions) are dropped. ``source``: ``continuation`` for the first ``placed[u]`` items
    of a model list (the continuation slots' episodes, ranked by the rule, not by their score), else
    ``model``; ``popular`` for users without known history."""
    n_users, k = out_idx.shape
    placed = np.zeros(n_users, dtype=np.int64) if placed is None else placed
    if not hist.user_ids.is_sorted():  # requested users without events were appended at the end
        order = hist.user_ids.arg_sort().to_numpy()
        out_idx, out_score = out_idx[order], out_score[order]
    else:
        order = np.arange(n_users)
    valid = np.isfinite(out_score).ravel()  # [U*k]
    user_row = np.repeat(order, k)[valid]
    ranks = np.tile(np.arange(1, k + 1, dtype=np.int16), n_users)[valid]
    frame = pl.DataFrame({
        USER_ID: hist.user_ids.gather(user_row),
        RANK: ranks,
        ITEM_ID: vocab.item_ids.gather(out_idx.ravel()[valid]),
        SCORE: out_score.ravel()[valid],
        "_model": from_model[user_row],
        "_placed": placed[user_row],
    })
    return frame.select(
        USER_ID, RANK, ITEM_ID, SCORE,
        pl.when(~pl.col("_model")).then(pl.lit("popular"))
        .when(pl.col(RANK) <= pl.col("_placed")).then(pl.lit("continuation"))
        .otherwise(pl.lit("model")).alias(SOURCE),
        pl.lit(loaded.name, dtype=pl.String).alias(MODEL_NAME),
        pl.lit(loaded.version, dtype=pl.String).alias(MODEL_VERSION),
        pl.lit(run_date, dtype=pl.Date).alias(RUN_DATE),
    )
