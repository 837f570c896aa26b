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
from dataclasses import replace
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
from recsys.model.policy import apply_policy
from recsys.schemas import EVENT_TYPE, ITEM_ID, TS, USER_ID
from recsys.serving.histories import event_files
from recsys.training.evaluate import count_at_least
from recsys.training.target_kinds import KINDS, target_kinds
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
            "evaluate.knn_neighbours=20",
            *([f"update.epochs={args.update_epochs}"] if args.update_epochs else []), *args.overrides]


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


def day_targets(events: pl.DataFrame, day: date, step_days: int = 1) -> pl.DataFrame:
    """user, first item watched on ``day`` (target), items before ``day`` in order (history) and whether
    each was watched to the end (completed, when the events say)."""
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    end = start + timedelta(days=step_days)
    before = events.filter(pl.col(TS) < start)
    targets = (events.filter((pl.col(TS) >= start) & (pl.col(TS) < end)).sort(USER_ID, TS)
               .group_by(USER_ID, maintain_order=True).agg(pl.col(ITEM_ID).first().alias("target")))
    hist = (before.filter(pl.col(USER_ID).is_in(targets[USER_ID].implode())).sort(USER_ID, TS)
            .group_by(USER_ID, maintain_order=True)
            .agg(pl.col(ITEM_ID).alias("history"), pl.col("completed").alias("completed")))
    return targets.join(hist, on=USER_ID, how="inner")


def rank_day(checkpoint: Path, day_rows: pl.DataFrame, slots: list[int | None]) -> dict[str, np.ndarray]:
    """Exact rank of every target under the model's stored policy (``None``) and under each other
    continuation-slot count of ``slots``; a target the model cannot rank (unknown item, no known history,
    masked) gets a rank above any cut-off. The ranking is the project's: scores, then
    recsys.model.policy.apply_policy over the user's history (the last ``MAX_HISTORY`` events)."""
    ckpt = load_checkpoint(checkpoint)
    model = build_model(ckpt)
    vocab = ckpt.vocab
    n = day_rows.height
    never = np.iinfo(np.int64).max
    out = {str(s): np.full(n, never, dtype=np.int64) for s in slots}
    target_idx = vocab.index_of(day_rows["target"])
    hist = day_rows["history"].list.tail(MAX_HISTORY)
    done_all = day_rows["completed"].list.tail(MAX_HISTORY).explode().fill_null(True).to_numpy()
    lengths = hist.list.len().to_numpy()
    flat = vocab.index_of(hist.explode())
    row_of = np.repeat(np.arange(n), lengths)
    keep = flat >= 0
    flat, row_of, done_all = flat[keep], row_of[keep], done_all[keep]
    known_len = np.bincount(row_of, minlength=n)
    starts = np.concatenate([[0], np.cumsum(known_len)[:-1]])
    ok = np.flatnonzero((known_len > 0) & (target_idx >= 0))
    for lo in range(0, len(ok), 512):
        rows = ok[lo:lo + 512]
        lens = known_len[rows]
        L = int(lens.max())
        pos = np.concatenate([starts[r] + np.arange(k) for r, k in zip(rows, lens, strict=True)])
        local = np.repeat(np.arange(len(rows)), lens)  # [P] row within the batch, time-ordered pairs
        items = torch.zeros(len(rows), L, dtype=torch.long)  # [b, L] right-padded
        items[torch.from_numpy(local), torch.from_numpy(_segment_index(lens))] = torch.from_numpy(flat[pos])
        rows_t, cols_t = torch.from_numpy(local), torch.from_numpy(flat[pos])
        done = torch.from_numpy(done_all[pos])
        tgt = torch.from_numpy(target_idx[rows])
        with torch.inference_mode():
            raw = model.score_items(model.final_states(items, torch.from_numpy(lens))).float()  # [b, n_items]
            for s in slots:
                policy = ckpt.policy if s is None else replace(ckpt.policy, continuation_slots=s)
                scores = raw.clone()
                apply_policy(scores, rows_t, cols_t, policy, completed=done)
                t_score = scores.gather(1, tgt[:, None])  # [b, 1]
                r = count_at_least(scores, t_score).numpy()
                r[(t_score[:, 0] == -float("inf")).numpy()] = never
                out[str(s)][rows] = r
    return out


def _segment_index(lengths: np.ndarray) -> np.ndarray:
    starts = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum())) - np.repeat(starts, lengths)


def subset_metrics(rank: np.ndarray, is_new: np.ndarray, kinds: np.ndarray) -> dict[str, dict[str, float]]:
    """HR@20 / MRR@20 (and counts) on all, new and old targets, and per target kind within new / old."""
    subsets = {"all": np.ones(len(rank), bool), "new": is_new, "old": ~is_new}
    for k, name in enumerate(KINDS):
        for part in ("new", "old"):
            subsets[f"{part}:{name}"] = subsets[part] & (kinds == k)
    out = {}
    for name, sel in subsets.items():
        rk = rank[sel]
        hits = rk <= K
        mrr = np.where(hits, 1.0 / np.maximum(rk, 1), 0.0)
        out[name] = {"n": int(sel.sum()), "hr": float(hits.mean()) if sel.any() else float("nan"),
                     "mrr": float(mrr.mean()) if sel.any() else float("nan")}
    return out


def replay_days(events: pl.DataFrame, n_days: int, before_last: int, step_days: int = 1) -> list[date]:
    """The ``n_days`` steps (of ``step_days`` days) ending ``before_last`` days before the last busy day
    (the spill-over tail of sittings past the period's end is not a day)."""
    per_date = events.group_by(pl.col(TS).dt.date().alias("d")).len().sort("d")
    busy = per_date.filter(pl.col("len") >= per_date["len"].median() / 2)
    last = busy["d"].max() - timedelta(days=before_last)
    last = last - timedelta(days=step_days - 1)  # the last step ends on the last busy day
    return [last - timedelta(days=(n_days - 1 - k) * step_days) for k in range(n_days)]


def retrain_days(n_days: int, k: int | None) -> set[int]:
    """Replay days (indices) on which the daily-retrain arm trains: every day (``k`` None), else the
    weekly days plus ``k`` others spread evenly over the replay."""
    others = [i for i in range(n_days) if i % 7]
    if k is None or k >= len(others):
        return set(range(n_days))
    picked = {others[round(j * (len(others) - 1) / max(k - 1, 1))] for j in range(k)} if k > 0 else set()
    return {i for i in range(n_days) if i % 7 == 0} | picked


def run_dataset(dataset: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    root = work / dataset
    t0 = time.perf_counter()
    config = prepare(dataset, root, args)
    catalogue = load_catalogue(config)
    lf = pl.scan_parquet(event_files(config.paths.events_dir))
    has_types = EVENT_TYPE in lf.collect_schema()
    partial = list(config.policy.partial_event_types)
    events = lf.select(USER_ID, ITEM_ID, TS, (~pl.col(EVENT_TYPE).is_in(partial)).fill_null(True).alias(
        "completed") if has_types else pl.lit(True).alias("completed")).collect()
    days = replay_days(events, args.days, args.before_last, args.step_days)
    ceiling_days = retrain_days(len(days), args.retrain_days)
    slots = [None, *(s for s in args.slots_sweep if s is not None)]
    print(f"[{dataset}] {events.height:,} events, replay {days[0]} .. {days[-1]}, daily retrain on "
          f"{len(ceiling_days)} days, prepared in {time.perf_counter() - t0:.0f} s (load {load()})",
          flush=True)
    current: dict[str, Path] = {}
    weekly_ids = pl.Series(dtype=pl.Int64)
    per_day = []
    for k, day in enumerate(days):
        split_dir = split_for(config, day, root)
        cfg = day_config(config, day)
        seconds: dict[str, float | None] = dict.fromkeys(ARMS, 0.0)
        if k % 7 == 0:  # weekly training: shared by all three arms
            t = time.perf_counter()
            res = train_model(cfg, split_dir, root / "ckpt" / f"weekly-{day}", evaluate_test=False)
            seconds = dict.fromkeys(ARMS, time.perf_counter() - t)
            current = dict.fromkeys(ARMS, res.best_checkpoint)
            weekly_ids = load_checkpoint(res.best_checkpoint).vocab.item_ids
        else:
            t = time.perf_counter()
            up = update_model(cfg, current["weekly+update"], f"day {k - 1}", split_dir,
                              root / "ckpt" / f"update-{day}", catalogue=catalogue, as_of=day, resume=False)
            seconds["weekly+update"] = time.perf_counter() - t
            current["weekly+update"] = up.checkpoint
            current.pop("daily-retrain", None)
            seconds["daily-retrain"] = None
            if k in ceiling_days:
                t = time.perf_counter()
                res = train_model(cfg, split_dir, root / "ckpt" / f"daily-{day}", evaluate_test=False)
                seconds["daily-retrain"] = time.perf_counter() - t
                current["daily-retrain"] = res.best_checkpoint
        rows = day_targets(events, day, args.step_days)
        is_new = ~rows["target"].is_in(weekly_ids.implode()).to_numpy()
        kinds = target_kinds(rows["history"], rows["target"], catalogue)
        metrics: dict[str, Any] = {}
        sweep: dict[str, Any] = {}
        ranked: dict[Path, dict[str, np.ndarray]] = {}  # arms sharing a model are ranked once
        for arm, ckpt in current.items():
            ranks = ranked[ckpt] = ranked.get(ckpt) or rank_day(ckpt, rows, slots)
            metrics[arm] = subset_metrics(ranks["None"], is_new, kinds)
            sweep[arm] = {s: subset_metrics(r, is_new, kinds) for s, r in ranks.items() if s != "None"}
        per_day.append({"day": str(day), "targets": rows.height, "seconds": seconds, "metrics": metrics,
                        "slots_sweep": sweep, "load": load()})
        m = metrics
        print(f"[{dataset}] {day}: {rows.height} targets ({m['weekly']['new']['n']} new) | HR@20 all "
              + " / ".join(_fmt(m, a, "all") for a in ARMS) + " | new "
              + " / ".join(_fmt(m, a, "new") for a in ARMS) + " | s "
              + " / ".join("-" if seconds[a] is None else f"{seconds[a]:.1f}" for a in ARMS)
              + f" | load {load()}", flush=True)
    return {"dataset": dataset, "events": events.height, "days": per_day,
            "summary": summarise(per_day, [str(s) for s in slots if s is not None]),
            "wall_seconds": round(time.perf_counter() - t0, 1)}


def _fmt(metrics: dict[str, Any], arm: str, subset: str) -> str:
    return f"{metrics[arm][subset]['hr']:.3f}" if arm in metrics else "-"


def _weighted(per_day: list[dict[str, Any]], get: Any, subset: str) -> dict[str, float]:
    """Target-weighted HR/MRR of ``subset`` over the days where ``get(day)`` has metrics."""
    cells = [c[subset] for d in per_day if (c := get(d)) is not None]
    n = np.array([c["n"] for c in cells], dtype=float)
    row = {"n": int(n.sum())}
    for m in ("hr", "mrr"):
        v = np.nan_to_num(np.array([c[m] for c in cells], dtype=float))
        row[m] = float((v * n).sum() / n.sum()) if n.sum() else float("nan")
    return row


def summarise(per_day: list[dict[str, Any]], sweep_slots: list[str]) -> dict[str, Any]:
    """Target-weighted HR/MRR over the replay per arm and subset (each arm over the days it ran), seconds
    per day, the per-kind breakdown, the slot sweep and the issue's checks."""
    subsets = list(per_day[0]["metrics"]["weekly"])
    out: dict[str, Any] = {}
    for arm in ARMS:
        row: dict[str, Any] = {}
        for subset in subsets:
            w = _weighted(per_day, lambda d, a=arm: d["metrics"].get(a), subset)
            row.update({f"{subset}_{key}": v for key, v in w.items()})
        secs = [d["seconds"][arm] for d in per_day if d["seconds"][arm] is not None]
        row["seconds_per_day"] = float(np.mean(secs))
        row["days"] = len(secs)
        out[arm] = row
    out["slots_sweep"] = {
        arm: {s: {sub: _weighted(per_day, lambda d, a=arm, s=s: d["slots_sweep"].get(a, {}).get(s), sub)
                  for sub in ("all", "new", "old")} for s in sweep_slots} for arm in ARMS}
    ceiling = [d for d in per_day if "daily-retrain" in d["metrics"]]  # every arm over the ceiling's days
    out["on_retrain_days"] = {arm: {sub: _weighted(ceiling, lambda d, a=arm: d["metrics"][a], sub)
                                    for sub in ("all", "new", "old")} for arm in ARMS}
    both = [d for i, d in enumerate(per_day) if i % 7 and d["seconds"]["daily-retrain"] is not None]
    upd = [d["seconds"]["weekly+update"] for d in both]
    full = [d["seconds"]["daily-retrain"] for d in both]
    out["checks"] = {
        "new_hr_vs_half_old_hr": [out["weekly+update"]["new_hr"], out["weekly+update"]["old_hr"] / 2],
        "days_update_below_weekly": [d["day"] for d in per_day if d["metrics"]["weekly+update"]["all"]["hr"]
                                     < d["metrics"]["weekly"]["all"]["hr"] - 1e-12],
        "update_over_full_training_time": float(np.mean(upd) / np.mean(full)) if upd and full else None,
        "time_ratio_days": [d["day"] for d in both],
    }
    return out


def print_table(result: dict[str, Any]) -> None:
    s = result["summary"]
    print(f"\n{result['dataset']}: {result['events']:,} events, {len(result['days'])} days "
          f"(targets: {s['weekly']['all_n']} all, {s['weekly']['new_n']} new items)")
    print("| arm | days | HR@20 all | MRR@20 all | HR@20 new | MRR@20 new | HR@20 old | MRR@20 old | s/day |")
    print("|---|---|---|---|---|---|---|---|---|")
    for arm in ARMS:
        r = s[arm]
        print(f"| {arm} | {r['days']} | {r['all_hr']:.4f} | {r['all_mrr']:.4f} | {r['new_hr']:.4f} | "
              f"{r['new_mrr']:.4f} | {r['old_hr']:.4f} | {r['old_mrr']:.4f} | {r['seconds_per_day']:.1f} |")
    print("\nHR@20 by target kind (n targets): new items | old items")
    print("| kind | " + " | ".join(f"{a} {part}" for part in ("new", "old") for a in ARMS) + " |")
    print("|---|" + "---|" * (2 * len(ARMS)))
    for kind in KINDS:
        if s["weekly"][f"new:{kind}_n"] + s["weekly"][f"old:{kind}_n"] == 0:
            continue
        cells = [f"{s[a][f'{part}:{kind}_hr']:.3f} ({s[a][f'{part}:{kind}_n']})"
                 for part in ("new", "old") for a in ARMS]
        print(f"| {kind} | " + " | ".join(cells) + " |")
    for arm, by_slots in s["slots_sweep"].items():
        for slots, sub in by_slots.items():
            print(f"sweep {arm} continuation_slots={slots}: HR@20 all {sub['all']['hr']:.4f} new "
                  f"{sub['new']['hr']:.4f} old {sub['old']['hr']:.4f} | MRR@20 all {sub['all']['mrr']:.4f}")
    for arm, sub in s["on_retrain_days"].items():
        print(f"on the {s['daily-retrain']['days']} daily-retrain days, {arm}: "
              f"HR@20 all {sub['all']['hr']:.4f} "
              f"new {sub['new']['hr']:.4f} old {sub['old']['hr']:.4f} | MRR@20 all {sub['all']['mrr']:.4f} "
              f"new {sub['new']['mrr']:.4f} old {sub['old']['mrr']:.4f}")
    c = s["checks"]
    new_hr, half_old = c["new_hr_vs_half_old_hr"]
    ratio = c["update_over_full_training_time"]
    print(f"checks: new HR@20 {new_hr:.4f} vs half old {half_old:.4f}; "
          f"days weekly+update below weekly: {c['days_update_below_weekly'] or 'none'}; "
          f"update / full training time: {'-' if ratio is None else f'{ratio:.2f}'} "
          f"(same days: {', '.join(c['time_ratio_days'])})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="synthetic,ml-latest-small")
    parser.add_argument("--events", type=parse_count, default=parse_count("1M"), help="synthetic events")
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--step-days", type=int, default=1,
                        help="days per replay step (a sparse log such as ml-latest-small: 7, so each step "
                             "has targets; the target is the user's first event of the step)")
    parser.add_argument("--before-last", type=int, default=0,
                        help="end the replay this many days before the last day (validation days for tuning)")
    parser.add_argument("--retrain-days", type=int, default=None,
                        help="the daily-retrain arm trains on the weekly days plus this many others, evenly "
                             "spread (default: every day)")
    parser.add_argument("--slots-sweep", type=lambda t: [int(x) for x in t.split(",") if x], default=[],
                        help="also rank every arm's models with these continuation_slots, e.g. 0,1,2,3")
    parser.add_argument("--epochs", type=int, default=3, help="full-training epochs")
    parser.add_argument("--update-epochs", type=int, default=None, help="default: update.epochs")
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
