"""Batch-scoring benchmark: ``recsys.serving.score.score_users`` on synthetic histories vs one user at a time.

For each size (users x items) a child process writes random events (Zipf item popularity, geometric
history lengths, hive-partitioned by day) and a randomly initialised GRU4Rec checkpoint; a second child
runs the real ``score_users`` (events Parquet -> published export, top-K, seen items excluded) and
reports its own time split; its peak RSS is that child's ``os.wait4`` rusage. A third child times the
straightforward way on a sample of users -- one user at a time through the pyfunc's ``recommend`` (the
code path of ``model.predict``), and one user at a time straight through the model -- and extrapolates.

    .venv/bin/python benchmarks/bench_score.py                        # 100k users x 20k items
    .venv/bin/python benchmarks/bench_score.py --sizes 1M:100k        # the large size (minutes)
    .venv/bin/python benchmarks/bench_score.py --sizes 20k:5k --device cuda

users/s = users / (every phase of score_users except loading the model: history, encode, score, popular,
assemble, validate, write); the JSON also has the figure with the model load. Torch threads: the scorer's
auto choice (idle cores) unless --threads; the one-by-one baseline uses the same number.

Targets (issue 5): >= 20,000 users/s at 100k x 20k (hidden 100, top-20) on the 2-core CPU;
1M x 100k within ~4 GB peak RSS. Results: table + benchmarks/results/bench_score.json (merged by size).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "bench_score.json"
RUN_DATE = date(2026, 3, 31)
DAYS = 30
USERS_PER_S_TARGET = 20_000
RSS_TARGET_GB = 4.0


def parse_count(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if text[-1:] in "km" else text) * scale)


def parse_size(text: str) -> tuple[int, int]:
    users, _, items = text.partition(":")
    return parse_count(users), parse_count(items or "20k")


def label(n: int) -> str:
    for div, suffix in ((1_000_000, "M"), (1_000, "k")):
        if n >= div and n % (div // 10) == 0:
            return f"{n / div:g}{suffix}"
    return str(n)


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# --- child: generate --------------------------------------------------------------------------------

def generate(work: Path, n_users: int, n_items: int, mean_history: float, hidden: int, seed: int) -> dict:
    """Events for ``n_users`` (geometric lengths, Zipf items) + a random GRU4Rec checkpoint."""
    import numpy as np
    import polars as pl
    import torch

    from recsys.config import Config
    from recsys.data.vocab import Vocab
    from recsys.model.checkpoint import save_checkpoint
    from recsys.model.gru4rec import GRU4Rec
    from recsys.schemas import COUNT, IDX, ITEM_ID, TS, USER_ID

    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.geometric(1.0 / mean_history, n_users), 400)  # [U] >= 1
    n_events = int(lengths.sum())
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8  # Zipf-like
    items = rng.choice(n_items, size=n_events, p=popularity / popularity.sum())  # [E]
    users = np.repeat(np.arange(n_users, dtype=np.int64), lengths)
    start = datetime.combine(RUN_DATE - timedelta(days=DAYS - 1), datetime.min.time(), tzinfo=UTC)
    first = rng.integers(0, (DAYS - 2) * 86_400, n_users)  # seconds after start
    step = rng.integers(60, 3_600, n_events)  # seconds between a user's events
    group_start = np.repeat(np.cumsum(lengths) - lengths, lengths)  # [E] first event of each user
    csum = np.cumsum(step)
    offset = csum - np.r_[0, csum][group_start]  # running sum of steps within each user
    seconds = np.minimum(np.repeat(first, lengths) + offset, DAYS * 86_400 - 1)
    ts = np.datetime64(start.replace(tzinfo=None), "us") + (seconds * 1_000_000).astype("timedelta64[us]")
    events = pl.DataFrame({USER_ID: users, ITEM_ID: items.astype(np.int64),
                           TS: pl.Series(ts).dt.replace_time_zone("UTC")}).sort(TS)
    events_dir = work / "data" / "events"
    shutil.rmtree(events_dir, ignore_errors=True)
    day = events[TS].dt.date()
    for (d,), part in events.with_columns(_d=day).partition_by("_d", as_dict=True).items():
        folder = events_dir / f"event_date={d.isoformat()}"
        folder.mkdir(parents=True, exist_ok=True)
        part.drop("_d").write_parquet(folder / "part-0.parquet")

    counts = np.bincount(items, minlength=n_items)
    order = np.lexsort((np.arange(n_items), -counts))  # vocab order: count desc, then id
    vocab = Vocab(pl.DataFrame({ITEM_ID: order.astype(np.int64), IDX: np.arange(n_items, dtype=np.int32),
                                COUNT: counts[order].astype(np.int64)}))
    config = Config.model_validate({"model": {"hidden_size": hidden}})
    torch.manual_seed(seed)
    model = GRU4Rec(n_items, config.model).eval()
    ckpt = save_checkpoint(work / "model.pt", model=model, optimizer=None, config=config, vocab=vocab,
                           epoch=0, metrics={})
    return {"events": n_events, "users": n_users, "items": n_items, "checkpoint": str(ckpt),
            "mean_history": float(lengths.mean())}


# --- child: batch scoring ---------------------------------------------------------------------------

def score(work: Path, top_k: int, device: str, threads: int | None, sets: list[str]) -> dict:

    from recsys.config import load_config
    from recsys.serving.score import score_users

    config = load_config(REPO / "conf", [f"paths.data_root={work / 'data'}", f"score.top_k={top_k}",
                                         f"score.device={device}", *sets,
                                         *([f"score.threads={threads}"] if threads else [])])
    t0 = time.perf_counter()
    manifest = score_users(config, model_uri=str(work / "model.pt"), run_date=RUN_DATE)
    manifest["wall_s"] = time.perf_counter() - t0
    keys = ("counts", "timings", "wall_s", "device", "rows", "peak_rss_gb_after", "precision",
            "torch_threads")
    return {k: manifest[k] for k in keys}


# --- child: the straightforward way -----------------------------------------------------------------

def baseline(work: Path, n_sample: int, top_k: int, device: str, max_history: int, seed: int,
             threads: int | None) -> dict:
    """One user at a time: through the pyfunc's ``recommend``, and straight through the model."""
    import polars as pl
    import torch

    if threads:
        torch.set_num_threads(threads)
    from recsys.model.checkpoint import build_model, load_checkpoint
    from recsys.model.pyfunc import recommend
    from recsys.schemas import ITEM_ID, TS, USER_ID

    dev = torch.device("cuda" if device == "cuda" else "cpu")
    ckpt = load_checkpoint(work / "model.pt", map_location=dev)
    model, vocab = build_model(ckpt, dev), ckpt.vocab
    users = pl.scan_parquet(work / "data" / "events" / "*" / "*.parquet").select(USER_ID).unique().collect()
    sample = users.sample(min(n_sample, users.height), seed=seed)[USER_ID]
    hist = (pl.scan_parquet(work / "data" / "events" / "*" / "*.parquet")
            .filter(pl.col(USER_ID).is_in(sample.implode())).sort(USER_ID, TS)
            .group_by(USER_ID, maintain_order=True).agg(pl.col(ITEM_ID)).collect())
    ids, histories = hist[USER_ID].to_list(), hist[ITEM_ID].to_list()
    # warm-up, untimed
    recommend(model, vocab, ids[:1], histories[:1], top_k=top_k, max_history=max_history, device=dev)

    t0 = time.perf_counter()
    for uid, h in zip(ids, histories, strict=True):
        recommend(model, vocab, [uid], [h], top_k=top_k, exclude_seen=True, max_history=max_history,
                  device=dev)
    pyfunc_s = time.perf_counter() - t0

    index = dict(zip(vocab.item_ids.to_list(), range(len(vocab)), strict=True))
    item_ids = vocab.item_ids.to_list()
    lists = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        for uid, h in zip(ids, histories, strict=True):
            h = [i for n, i in enumerate(h) if n == 0 or h[n - 1] != i]  # repeats dropped, as the scorer does
            known = [index[i] for i in h if i in index]
            seq = known[-max_history:]
            state = model.final_states(torch.tensor([seq], device=dev), torch.tensor([len(seq)], device=dev))
            s = model.score_items(state)[0]  # [n_items]
            s[torch.tensor(known, device=dev)] = -torch.inf
            lists[uid] = [item_ids[i] for i in torch.topk(s, top_k).indices.tolist()]
    if dev.type == "cuda":
        torch.cuda.synchronize()
    model_s = time.perf_counter() - t0
    # the batch export must hold the same lists (bfloat16 may swap near-tied items)
    export = (pl.scan_parquet(work / "data" / "exports" / "recs" / "run_date=*" / "*.parquet")
              .filter(pl.col(USER_ID).is_in(sample.implode())).sort(USER_ID, "rank")
              .group_by(USER_ID, maintain_order=True).agg(pl.col(ITEM_ID)).collect())
    got = dict(zip(export[USER_ID].to_list(), export[ITEM_ID].to_list(), strict=True))
    overlap = [len(set(got.get(u, [])) & set(v)) / len(v) for u, v in lists.items()]
    same = [got.get(u) == v for u, v in lists.items()]
    return {"sample_users": len(ids), "pyfunc_users_per_s": len(ids) / pyfunc_s,
            "model_users_per_s": len(ids) / model_s,
            "agreement_at_k": sum(overlap) / len(overlap), "identical_lists": sum(same) / len(same)}


# --- parent -----------------------------------------------------------------------------------------

def run_child(args: list[str]) -> tuple[dict, float]:
    """Run this script as a child; returns its JSON result and its peak RSS in GB (wait4 rusage)."""
    out = Path(tempfile.mkstemp(prefix="bench_score-", suffix=".json")[1])
    proc = subprocess.Popen([sys.executable, __file__, "--child", *args, "--child-out", str(out)], cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child {args[0]} failed with exit code {os.waitstatus_to_exitcode(status)}")
    result = json.loads(out.read_text())
    out.unlink()
    return result, usage.ru_maxrss / 1024**2  # KiB -> GiB


def bench_size(n_users: int, n_items: int, a: argparse.Namespace, base: Path) -> dict[str, Any]:
    name = f"{label(n_users)}x{label(n_items)}"
    work = base / name
    work.mkdir(parents=True, exist_ok=True)
    common = ["--top-k", str(a.top_k), "--device", a.device]
    gen_args = ["--users", str(n_users), "--items", str(n_items), "--mean-history", str(a.mean_history),
                "--hidden", str(a.hidden), "--seed", str(a.seed)]
    stamp = work / "generated.json"
    if a.keep and stamp.exists() and json.loads(stamp.read_text())["args"] == gen_args:
        gen = json.loads(stamp.read_text())  # same data as last time (--keep)
    else:
        print(f"[{name}] generating ... (load {load_average()})", flush=True)
        gen, _ = run_child(["generate", "--work", str(work), *gen_args])
        stamp.write_text(json.dumps({**gen, "args": gen_args}))
    load_before = load_average()
    print(f"[{name}] scoring {n_users:,} users ... (load {load_before})", flush=True)
    sets = [x for s in a.set or [] for x in ("--set", s)]
    sc, rss = run_child(["score", "--work", str(work), *common, *sets,
                         *(["--threads", str(a.threads)] if a.threads else [])])
    load_after = load_average()
    print(f"[{name}] one user at a time on {a.baseline_users} users ...", flush=True)
    threads = ["--threads", str(a.threads or sc["torch_threads"])]  # same threads as the batch run: fair
    bl, _ = run_child(["baseline", "--work", str(work), *common, "--baseline-users", str(a.baseline_users),
                       "--seed", str(a.seed), *threads]) if a.baseline_users else ({}, 0.0)
    t = sc["timings"]
    processing = sum(v for k, v in t.items() if k not in ("load_model_s", "total_s"))
    users_per_s = n_users / processing
    result = {
        "size": name, "users": n_users, "items": n_items, "events": gen["events"],
        "mean_history": round(gen["mean_history"], 2), "top_k": a.top_k, "hidden": a.hidden,
        "device": sc["device"], "precision": sc["precision"], "torch_threads": sc["torch_threads"],
        "users_per_s": round(users_per_s),
        "users_per_s_with_model_load": round(n_users / t["total_s"]),
        "seconds": {k.removesuffix("_s"): round(v, 3) for k, v in t.items()},
        "peak_rss_gb": round(rss, 3), "peak_rss_gb_after_phase": sc["peak_rss_gb_after"],
        "rows": sc["rows"], "counts": sc["counts"],
        "baseline": {k: round(v, 1) if isinstance(v, float) else v for k, v in bl.items()},
        "speedup_vs_pyfunc": round(users_per_s / bl["pyfunc_users_per_s"], 1) if bl else None,
        "speedup_vs_model_per_user": round(users_per_s / bl["model_users_per_s"], 1) if bl else None,
        "load_before": load_before, "load_after": load_after,
        "cpu_threads": a.threads or os.cpu_count(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "targets": {"users_per_s": USERS_PER_S_TARGET, "peak_rss_gb": RSS_TARGET_GB},
    }
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def print_table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="recsys score: batch scoring benchmark (top-K, seen items excluded)")
    for col in ("size", "device", "prec/threads", "users/s", "history s", "encode s", "score s", "write s",
                "other s", "peak RSS GB", "1-by-1 pyfunc u/s", "speed-up", "same top-K",
                "load (before/after)"):
        table.add_column(col, justify="right")
    for r in results:
        s = r["seconds"]
        write = s.get("validate", 0) + s.get("write", 0)
        other = s.get("popular", 0) + s.get("assemble", 0)
        table.add_row(
            r["size"], r["device"], f"{r['precision']}/{r['torch_threads']}", f"{r['users_per_s']:,}",
            f"{s['history']:.2f}", f"{s.get('encode', 0):.2f}",
            f"{s.get('score', 0):.2f}", f"{write:.2f}", f"{other:.2f}", f"{r['peak_rss_gb']:.2f}",
            f"{r['baseline'].get('pyfunc_users_per_s', 0):,.0f}", f"{r['speedup_vs_pyfunc'] or 0:,.0f}x",
            f"{r['baseline'].get('agreement_at_k', float('nan')):.3f}",
            f"{r['load_before']} / {r['load_after']}",
        )
    Console(width=200).print(table)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100k:20k", help="comma-separated USERS:ITEMS, e.g. 100k:20k,1M:100k")
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--hidden", type=int, default=100)
    p.add_argument("--mean-history", type=float, default=15.0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the scoring child")
    p.add_argument("--baseline-users", type=int, default=500, help="sample for the one-at-a-time timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", help="config override for the scoring child (repeatable)")
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    p.add_argument("--keep", action="store_true", help="keep the generated data")
    p.add_argument("--out", type=Path, default=RESULTS)
    # child side
    p.add_argument("--child", choices=("generate", "score", "baseline"))
    p.add_argument("--child-out", type=Path)
    p.add_argument("--work", type=Path)
    p.add_argument("--users", type=int)
    p.add_argument("--items", type=int)
    a = p.parse_args(argv)

    if a.child:
        sys.path.insert(0, str(REPO))
        if a.child == "generate":
            res = generate(a.work, a.users, a.items, a.mean_history, a.hidden, a.seed)
        elif a.child == "score":
            res = score(a.work, a.top_k, a.device, a.threads, a.set or [])
        else:
            res = baseline(a.work, a.baseline_users, a.top_k, a.device, 50, a.seed, a.threads)
        a.child_out.write_text(json.dumps(res, default=str))
        return

    base = a.workdir or Path(tempfile.mkdtemp(prefix="bench_score-"))
    results = [bench_size(*parse_size(s), a, base) for s in a.sizes.split(",")]
    print_table(results)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(a.out.read_text()) if a.out.exists() else {}
    for r in results:
        merged[f"{r['size']}-{r['device']}-{r['precision']}-t{r['torch_threads']}"] = r
    a.out.write_text(json.dumps(merged, indent=2))
    print(f"results -> {a.out}")
    if a.workdir is None and not a.keep:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
