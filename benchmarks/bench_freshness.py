"""Freshness benchmark: day-by-day replay of the last N days, three arms in the same run.

Every day ``d`` of the replay, each arm's current model (trained on events before ``d``) scores every
active user (history before ``d``, a watch on ``d``); the target is the user's first watch on ``d``.
HR@20 and MRR@20 (conservative ties, the project's rule) are reported on all targets, on targets that
are new items (not in the vocabulary of the current weekly model) and on the rest. Arms:

* ``weekly``: a full training every 7 days (days 0, 7, ...), nothing in between;
* ``weekly+update``: the same weekly trainings, and on the other days the daily incremental update
  (recsys.training.update) of the previous day's model;
* ``daily-retrain``: a full training every day (the ceiling).

Seconds per day per arm are the training / update wall time on that day. Data: synthetic logs (with new
releases during the replay: ``generate.days`` 28 puts the last releases on day 20, inside a 14-day
replay) and ml-latest-small (``/work/shared/data``; user sequences, a movie is new until rated). One
sessions build (``sessions.min_item_support=1``, so no future event decides what an item is) and one
temporal split per day (test cutoff = the day, one validation day before it).

    .venv/bin/python benchmarks/bench_freshness.py                          # both datasets, defaults
    .venv/bin/python benchmarks/bench_freshness.py --datasets synthetic --events 1M --epochs 5

Targets (issue 15): new-item HR@20 with updates >= half the old-item HR@20 on synthetic data; overall
HR@20 of weekly+update never below weekly on any day; an update <= 20 % of a full training's time.
Results: a table per dataset + benchmarks/results/bench_freshness.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from recsys.config import Config, load_config
from recsys.data.catalogue import ingest_catalogue, load_catalogue
from recsys.data.ingest import ingest_files
from recsys.data.sessions import build_sessions
from recsys.data.split import split_sessions
from recsys.data.synthetic import generate
from recsys.model.checkpoint import build_model, load_checkpoint
from recsys.schemas import ITEM_ID, TS, USER_ID
from recsys.serving.histories import event_files
from recsys.training.evaluate import count_at_least, resolve_exclude_seen
from recsys.training.train import train_model
from recsys.training.update import update_model

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "bench_freshness.json"
ML_SMALL = Path("/work/shared/data/ml-latest-small")
ARMS = ("weekly", "weekly+update", "daily-retrain")
K = 20
MAX_HISTORY = 50


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_count(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if text[-1:] in "km" else text) * scale)


def base_overrides(root: Path, args: argparse.Namespace) -> list[str]:
    return [f"paths.data_root={root}", "sessions.min_item_support=1", f"train.epochs={args.epochs}",
            f"train.patience={args.epochs}", f"model.hidden_size={args.hidden}",
            f"train.n_sample={args.n_sample}", "train.device=cpu", "tracking.system_metrics=false",
            "split.valid_days=1", "split.test_days=1",  # test_cutoff (set per replay day) wins
            "evaluate.knn_neighbours=20", f"update.epochs={args.update_epochs}", *args.overrides]


def prepare(dataset: str, root: Path, args: argparse.Namespace) -> Config:
    """Events (+ catalogue) ingested and sessionised once under ``root``."""
    if dataset == "synthetic":
        config = load_config(None, [*base_overrides(root, args), f"generate.n_events={args.events}",
                                    "generate.days=28", "generate.new_release_fraction=0.15"])
        generated = generate(config)
        ingest_files([Path(f) for f in generated["files"]], config)
        ingest_catalogue(Path(generated["catalogue"]), config)
    else:
        config = load_config(None, [*base_overrides(root, args), "ingest.preset=movielens-csv",
                                    "sessions.mode=user", "ingest.max_future_days=10000"])
        ingest_files([ML_SMALL / "ratings.csv"], config)
        ingest_catalogue(ML_SMALL / "movies.csv", config)
    build_sessions(config)
    return config


def day_config(config: Config, day: date) -> Config:
    return config.model_copy(update={"split": config.split.model_copy(
        update={"test_cutoff": datetime(day.year, day.month, day.day, tzinfo=UTC)})})


def split_for(config: Config, day: date, root: Path) -> Path:
    out = root / "splits" / day.isoformat()
    if not out.exists():
        split_sessions(day_config(config, day), out_dir=out)
    return out


def day_targets(events: pl.DataFrame, day: date) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(targets: user, first item watched on ``day``; histories: user, items before ``day`` in order)."""
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    end = start + timedelta(days=1)
    before = events.filter(pl.col(TS) < start)
    targets = (events.filter((pl.col(TS) >= start) & (pl.col(TS) < end)).sort(USER_ID, TS)
               .group_by(USER_ID, maintain_order=True).agg(pl.col(ITEM_ID).first().alias("target")))
    hist = (before.filter(pl.col(USER_ID).is_in(targets[USER_ID].implode())).sort(USER_ID, TS)
            .group_by(USER_ID, maintain_order=True).agg(pl.col(ITEM_ID).alias("history")))
    return targets.join(hist, on=USER_ID, how="inner"), hist


def evaluate_day(checkpoint: Path, day_rows: pl.DataFrame, weekly_vocab_ids: pl.Series,
                 exclude_seen: bool) -> dict[str, dict[str, float]]:
    """HR@20 / MRR@20 on all, new and old targets; unrankable targets count as misses."""
    ckpt = load_checkpoint(checkpoint)
    model = build_model(ckpt)
    vocab = ckpt.vocab
    n = day_rows.height
    rank = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    target_idx = vocab.index_of(day_rows["target"])
    hist = day_rows["history"].list.tail(MAX_HISTORY)
    lengths = hist.list.len().to_numpy()
    flat = vocab.index_of(hist.explode())
    row_of = np.repeat(np.arange(n), lengths)
    keep = flat >= 0
    known_len = np.bincount(row_of[keep], minlength=n)
    ok = np.flatnonzero((known_len > 0) & (target_idx >= 0))
    for lo in range(0, len(ok), 512):
        rows = ok[lo:lo + 512]
        L = int(known_len[rows].max())
        items = torch.zeros(len(rows), L, dtype=torch.long)  # [b, L] right-padded
        for j, r in enumerate(rows):
            seq = flat[(row_of == r) & keep]
            items[j, : len(seq)] = torch.from_numpy(seq)
        lens = torch.from_numpy(known_len[rows])
        with torch.inference_mode():
            scores = model.score_items(model.final_states(items, lens)).float()  # [b, n_items]
            if exclude_seen:
                mask = torch.arange(L)[None, :] < lens[:, None]
                scores[torch.arange(len(rows))[:, None].expand(-1, L)[mask], items[mask]] = -float("inf")
            tgt = torch.from_numpy(target_idx[rows])
            t_score = scores.gather(1, tgt[:, None])  # [b, 1]
            r = count_at_least(scores, t_score).numpy()
            r[(t_score[:, 0] == -float("inf")).numpy()] = np.iinfo(np.int64).max
        rank[rows] = r
    is_new = ~day_rows["target"].is_in(weekly_vocab_ids.implode()).to_numpy()
    out = {}
    for name, sel in (("all", np.ones(n, bool)), ("new", is_new), ("old", ~is_new)):
        rk = rank[sel]
        hits = rk <= K
        mrr = np.where(hits, 1.0 / np.maximum(rk, 1), 0.0)
        out[name] = {"n": int(sel.sum()), "hr": float(hits.mean()) if sel.any() else float("nan"),
                     "mrr": float(mrr.mean()) if sel.any() else float("nan")}
    return out


def run_dataset(dataset: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    root = work / dataset
    t0 = time.perf_counter()
    config = prepare(dataset, root, args)
    catalogue = load_catalogue(config)
    events = pl.scan_parquet(event_files(config.paths.events_dir)).select(USER_ID, ITEM_ID, TS).collect()
    per_date = events.group_by(pl.col(TS).dt.date().alias("d")).len().sort("d")
    busy = per_date.filter(pl.col("len") >= per_date["len"].median() / 2)  # not the spill-over tail
    last = busy["d"].max()
    days = [last - timedelta(days=args.days - 1 - k) for k in range(args.days)]
    exclude_seen = resolve_exclude_seen(config)
    print(f"[{dataset}] {events.height:,} events, replay {days[0]} .. {days[-1]}, prepared in "
          f"{time.perf_counter() - t0:.0f} s (load {load()})", flush=True)
    current: dict[str, Path] = {}
    weekly_ids = pl.Series(dtype=pl.Int64)
    per_day = []
    for k, day in enumerate(days):
        split_dir = split_for(config, day, root)
        cfg = day_config(config, day)
        seconds = dict.fromkeys(ARMS, 0.0)
        if k % 7 == 0:  # weekly training: shared by the weekly and weekly+update arms
            t = time.perf_counter()
            res = train_model(cfg, split_dir, root / "ckpt" / f"weekly-{day}", evaluate_test=False)
            seconds["weekly"] = seconds["weekly+update"] = time.perf_counter() - t
            current["weekly"] = current["weekly+update"] = res.best_checkpoint
            weekly_ids = load_checkpoint(res.best_checkpoint).vocab.item_ids
        else:
            t = time.perf_counter()
            up = update_model(cfg, current["weekly+update"], f"day {k - 1}", split_dir,
                              root / "ckpt" / f"update-{day}", catalogue=catalogue, as_of=day, resume=False)
            seconds["weekly+update"] = time.perf_counter() - t
            current["weekly+update"] = up.checkpoint
        if k % 7 == 0:
            current["daily-retrain"] = current["weekly"]
            seconds["daily-retrain"] = seconds["weekly"]
        else:
            t = time.perf_counter()
            res = train_model(cfg, split_dir, root / "ckpt" / f"daily-{day}", evaluate_test=False)
            seconds["daily-retrain"] = time.perf_counter() - t
            current["daily-retrain"] = res.best_checkpoint
        rows, _ = day_targets(events, day)
        metrics = {arm: evaluate_day(current[arm], rows, weekly_ids, exclude_seen) for arm in ARMS}
        per_day.append({"day": str(day), "targets": rows.height, "seconds": seconds, "metrics": metrics,
                        "load": load()})
        m = metrics
        print(f"[{dataset}] {day}: {rows.height} targets ({m['weekly']['new']['n']} new) | HR@20 all "
              + " / ".join(f"{m[a]['all']['hr']:.3f}" for a in ARMS) + " | new "
              + " / ".join(f"{m[a]['new']['hr']:.3f}" for a in ARMS) + " | s "
              + " / ".join(f"{seconds[a]:.1f}" for a in ARMS) + f" | load {load()}", flush=True)
    return {"dataset": dataset, "events": events.height, "days": per_day, "summary": summarise(per_day),
            "wall_seconds": round(time.perf_counter() - t0, 1)}


def summarise(per_day: list[dict[str, Any]]) -> dict[str, Any]:
    """Target-weighted HR/MRR over the replay per arm and subset, seconds per day, the issue's checks."""
    out: dict[str, Any] = {}
    for arm in ARMS:
        row: dict[str, Any] = {}
        for subset in ("all", "new", "old"):
            n = np.array([d["metrics"][arm][subset]["n"] for d in per_day], dtype=float)
            for m in ("hr", "mrr"):
                v = np.nan_to_num(np.array([d["metrics"][arm][subset][m] for d in per_day], dtype=float))
                row[f"{subset}_{m}"] = float((v * n).sum() / n.sum()) if n.sum() else float("nan")
            row[f"{subset}_n"] = int(n.sum())
        row["seconds_per_day"] = float(np.mean([d["seconds"][arm] for d in per_day]))
        out[arm] = row
    upd = [d["seconds"]["weekly+update"] for i, d in enumerate(per_day) if i % 7]
    full = [d["seconds"]["daily-retrain"] for i, d in enumerate(per_day) if i % 7]
    out["checks"] = {
        "new_hr_vs_half_old_hr": [out["weekly+update"]["new_hr"], out["weekly+update"]["old_hr"] / 2],
        "days_update_below_weekly": [d["day"] for d in per_day if d["metrics"]["weekly+update"]["all"]["hr"]
                                     < d["metrics"]["weekly"]["all"]["hr"] - 1e-12],
        "update_over_full_training_time": float(np.mean(upd) / np.mean(full)) if upd and full else None,
    }
    return out


def print_table(result: dict[str, Any]) -> None:
    s = result["summary"]
    print(f"\n{result['dataset']}: {result['events']:,} events, {len(result['days'])} days "
          f"(targets: {s['weekly']['all_n']} all, {s['weekly']['new_n']} new items)")
    print("| arm | HR@20 all | MRR@20 all | HR@20 new | MRR@20 new | HR@20 old | MRR@20 old | s/day |")
    print("|---|---|---|---|---|---|---|---|")
    for arm in ARMS:
        r = s[arm]
        print(f"| {arm} | {r['all_hr']:.4f} | {r['all_mrr']:.4f} | {r['new_hr']:.4f} | {r['new_mrr']:.4f} | "
              f"{r['old_hr']:.4f} | {r['old_mrr']:.4f} | {r['seconds_per_day']:.1f} |")
    c = s["checks"]
    new_hr, half_old = c["new_hr_vs_half_old_hr"]
    print(f"checks: new HR@20 {new_hr:.4f} vs half old {half_old:.4f}; "
          f"days weekly+update below weekly: {c['days_update_below_weekly'] or 'none'}; "
          f"update / full training time: {c['update_over_full_training_time']:.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="synthetic,ml-latest-small")
    parser.add_argument("--events", type=parse_count, default=parse_count("1M"), help="synthetic events")
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--epochs", type=int, default=3, help="full-training epochs")
    parser.add_argument("--update-epochs", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=100)
    parser.add_argument("--n-sample", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra config override, e.g. update.parent_weight=0.5 (repeatable)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-freshness-"))
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_start": load()},
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "datasets": {}}
    try:
        for dataset in args.datasets.split(","):
            result = run_dataset(dataset.strip(), args, work)
            results["datasets"][dataset] = result
            print_table(result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        results["machine"]["load_end"] = load()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str))
        print(f"\nwritten {args.out} (load start {results['machine']['load_start']}, end {load()})")


if __name__ == "__main__":
    main()
