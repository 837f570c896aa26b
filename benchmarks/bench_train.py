"""GRU4Rec benchmark: accuracy (MovieLens and synthetic data) vs baselines, and training speed.

    .venv/bin/python benchmarks/bench_train.py [--part accuracy,speed,temporal,synthetic] [--seeds 3]
        [--device cpu|cuda] [--synthetic-events 300000] [--original PATH]

Parts: ``accuracy`` ml-100k leave-one-out; ``temporal`` ml-latest-small, temporal split; ``synthetic``
the generator's viewing logs through the whole pipeline with ``conf/`` as it ships (gap sessions,
temporal split); ``speed`` training events/s at the issue's fixed setting on ml-100k and on the
generated data, the original authors' code (``--original PATH``: a folder holding their
gru4rec_pytorch.py, run by benchmarks/original_gru4rec.py in its own process), the plain (autograd) step,
the hand-written step and the compiled hand-written step side by side, every epoch including the first;
``speed-gpu`` (not in the default set) the GPU figures for benchmarks/device_check.sh.

Prints a rich table and writes ``benchmarks/results/bench_train.json``. The MovieLens files are read
from ``../shared/data`` (or ``--data``), never copied into the repository. Splits are built by the
project's own pipeline (ingest -> sessions -> split) when it is importable; otherwise by a direct polars
reader that applies the same protocol (whole-user sequences, sorted by time then item id).

Accuracy runs use the ``movielens`` profile (conf/profiles/movielens.yaml: settings tuned on the ml-100k
leave-one-out *validation* split, see benchmarks/tune_ml100k.py); the test numbers use them unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recsys.config import Config, load_config  # noqa: E402
from recsys.data.vocab import Vocab  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results" / "bench_train.json"

# The tuned settings ship as conf/profiles/movielens.yaml (chosen on the ml-100k leave-one-out
# *validation* split with benchmarks/tune_ml100k.py); the test numbers below use them unchanged.
PROFILE = "movielens"
# The speed setting the issue fixes (hidden 100, batch 64, n_sample 512, cross-entropy, shared embedding).
SPEED_OVERRIDES = [
    "model.hidden_size=100",
    "model.embedding=shared",
    "model.n_layers=1",
    "model.dropout_embed=0.0",
    "model.dropout_hidden=0.0",
    "train.loss=cross_entropy",
    "train.batch_size=64",
    "train.n_sample=512",
    "train.epochs=1",
]
# The published GRU4Rec's training behaviour (docs/gru4rec-fidelity.md), on top of the same
# hyperparameters: logQ of in-batch targets by count, target-equal columns kept as negatives, sequences by
# start time every epoch, dropped-out hidden state carried, no history bias, a fixed number of epochs (the
# last one is kept: no early stopping, no refit), nothing masked at ranking.
PUBLISHED = [
    "policy.exclude=none",
    "model.history_bias=false",
    "model.dropout_state=true",
    "train.logq_targets=count",
    "train.mask_duplicate_targets=false",
    "train.epoch_order=start_time",
    "train.mask_seen_negatives=false",
    "train.refit=false",
    "train.patience=1000",
]
# Accuracy views: (name, seen items masked at evaluation, extra overrides). Each view is a recommendation
# policy stored in its model and applied by the evaluation. "shipped" is the configuration as it ships
# (the policy from the split: every rated film excluded for MovieLens' whole-user sequences, finished
# titles excluded with series continuation for the synthetic sessions); "unmasked-plain" is our model
# without the learned history bias, run only where the configuration turns the bias on; "published" our
# code with the published behaviour above, beside our defaults in the same run.
VIEWS = (
    ("shipped", True, []),
    ("unmasked", False, ["policy.exclude=none"]),
    ("unmasked-plain", False, ["policy.exclude=none", "model.history_bias=false"]),
    ("published", False, PUBLISHED),
)
REFERENCE = {  # original authors' PyTorch GRU4Rec under this protocol (issue 3), mean of 3 seeds
    "gru4rec (reference)": {
        "shipped (masked)": {"recall@20": 0.300, "mrr@20": 0.080},
        "unmasked": {"recall@20": 0.215, "mrr@20": 0.056, "ndcg@10": 0.070},
    },
    "most-popular (reference)": {"unmasked": {"recall@20": 0.083, "mrr@20": 0.016}},
}
SPLIT_COLUMNS = {"user_id": pl.Int64, "items": pl.List(pl.Int64), "n_context": pl.Int32,
                 "start_ts": pl.Datetime("us", "UTC")}


def load_avg() -> str:
    """``uptime`` load averages: the machine is shared, so every figure is reported beside it."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --- splits ----------------------------------------------------------------------------------------


def read_ratings(dataset: str, data: Path) -> pl.DataFrame:
    """(user_id, item_id, ts seconds) of a MovieLens file, sorted by user and time.

    Equal timestamps keep the file's order (a stable sort): that is how the reference GRU4Rec run was
    split (its most-popular figures, 0.083 / 0.016, are reproduced only with this tie rule; breaking
    ties by item id instead gives 0.045 / 0.008, because ml-100k users often rate their last items in
    the same second and higher ids are rarer films).
    """
    if dataset == "ml-100k":
        df = pl.read_csv(
            data / "ml-100k" / "u.data",
            separator="\t",
            has_header=False,
            new_columns=["user_id", "item_id", "rating", "ts"],
        )
    else:
        df = pl.read_csv(data / "ml-latest-small" / "ratings.csv").rename(
            {"userId": "user_id", "movieId": "item_id", "timestamp": "ts"}
        )
    return df.select("user_id", "item_id", "ts").sort(["user_id", "ts"], maintain_order=True)


def _write(out: Path, name: str, frame: pl.DataFrame) -> None:
    frame.select(pl.col(k).cast(v) for k, v in SPLIT_COLUMNS.items()).write_parquet(out / name)


def write_split_direct(df: pl.DataFrame, protocol: str, out: Path) -> Path:
    """The split contract built directly (fallback while the pipeline stages are not importable)."""
    out.mkdir(parents=True, exist_ok=True)
    seqs = df.group_by("user_id", maintain_order=True).agg(pl.col("item_id").alias("items"), pl.col("ts"))
    # first event time: the published code orders sequences by it (train.epoch_order=start_time)
    seqs = seqs.with_columns(start_ts=pl.from_epoch(pl.col("ts").list.first(), time_unit="s"))
    seqs = seqs.filter(pl.col("items").list.len() >= 3)
    if protocol == "leave_one_out":
        n = pl.col("items").list.len()
        train = seqs.select("user_id", pl.col("items").list.head(n - 2), "start_ts", n_context=pl.lit(0))
        valid = seqs.select("user_id", pl.col("items").list.head(n - 1), "start_ts", n_context=n - 2)
        test = seqs.select("user_id", "items", "start_ts", n_context=n - 1)
    else:  # temporal: test = last 10% of the time range, valid = the 10% before it
        lo, hi = df["ts"].min(), df["ts"].max()
        test_cut = hi - 0.1 * (hi - lo)
        valid_cut = test_cut - 0.1 * (hi - lo)
        before = lambda cut: pl.col("ts").list.eval(pl.element() < cut).list.sum()  # noqa: E731
        train = seqs.select("user_id", pl.col("items").list.head(before(valid_cut)), "start_ts",
                            n_context=pl.lit(0))
        valid = seqs.select(
            "user_id", pl.col("items").list.head(before(test_cut)), "start_ts", n_context=before(valid_cut)
        )
        valid = valid.filter(pl.col("items").list.len() > pl.col("n_context"))
        test = seqs.select("user_id", "items", "start_ts", n_context=before(test_cut))
        test = test.filter(pl.col("items").list.len() > pl.col("n_context"))
    _write(out, "train.parquet", train)
    _write(out, "valid.parquet", valid)
    _write(out, "test.parquet", test)
    Vocab.from_items(train["items"].explode().drop_nulls()).save(out / "vocab.parquet")
    return out


def prepare_split(
    dataset: str, protocol: str, data: Path, root: Path, source: str = "pipeline"
) -> tuple[Path, str]:
    """Split directory for one dataset/protocol; (path, how it was built).

    ``source="direct"`` (or a pipeline that is not importable) uses the polars reader above, whose
    timestamp ties keep file order like the reference run; the pipeline breaks ties by item id.
    """
    config = bench_config(root, protocol)
    try:
        from recsys.data.ingest import ingest_files
        from recsys.data.sessions import build_sessions
        from recsys.data.split import split_sessions
    except ImportError:
        source = "direct"
    if source == "direct":
        return write_split_direct(
            read_ratings(dataset, data), protocol, root / "split"
        ), "direct polars reader (timestamp ties in file order)"
    src = data / "ml-100k" / "u.data" if dataset == "ml-100k" else data / "ml-latest-small" / "ratings.csv"
    config.ingest.preset = "movielens-100k" if dataset == "ml-100k" else "movielens-csv"
    ingest_files([src], config)
    build_sessions(config)
    split_sessions(config)
    return config.paths.split_dir, "recsys pipeline (ingest -> sessions -> split)"


def prepare_synthetic(root: Path, n_events: int) -> Path:
    """The demo data at benchmark size through the whole pipeline: generate -> ingest -> gap sessions ->
    temporal split, all with ``conf/`` as it ships (no profile)."""
    from recsys.data.ingest import ingest_files
    from recsys.data.sessions import build_sessions
    from recsys.data.split import split_sessions
    from recsys.data.synthetic import generate

    config = bench_config(root, "temporal", [f"generate.n_events={n_events}"], profile=None)
    written = generate(config)
    ingest_files([Path(f) for f in written["files"]], config)
    build_sessions(config)
    split_sessions(config)
    return config.paths.split_dir


def bench_config(root: Path, protocol: str, extra: list[str] = (), profile: str | None = PROFILE) -> Config:
    """conf/ + the profile (whole-user sequences and the tuned settings) + ``extra`` overrides."""
    values = {"paths": {"data_root": str(root)}, "split": {"protocol": protocol}}
    return load_config(Path(__file__).resolve().parent.parent / "conf", list(extra), values, profile=profile)


# --- parts -----------------------------------------------------------------------------------------


def run_accuracy(
    split_dir: Path,
    root: Path,
    protocol: str,
    seeds: list[int],
    device: str,
    log,
    extra: list[str] = (),
    profile: str | None = PROFILE,
) -> dict:
    """Per seed and per view (seen items masked / not masked): train, select on validation, test.

    Each view is its own protocol, so each gets a model trained and selected for it: the masked view
    uses the profile as it is (history items are not negatives, validation masks them), the
    unmasked view the same settings with ``mask_seen_negatives`` off and unmasked validation, since
    there the model itself must learn to rank already-seen items down (with ``model.history_bias`` it
    learns one offset for them); "unmasked-plain" is that view without the history bias, when the
    configuration has it on. Baselines once per view.
    """
    from recsys.model.checkpoint import build_model, load_checkpoint
    from recsys.model.recommender import GRU4RecRecommender
    from recsys.training.evaluate import evaluate_all
    from recsys.training.train import train_model

    with_bias = bench_config(root, protocol, list(extra), profile=profile).model.history_bias
    views = [v for v in VIEWS if with_bias or v[0] != "unmasked-plain"]
    per_seed = []
    for seed in seeds:
        row: dict = {"seed": seed}
        for view, _masked, view_extra in views:
            cfg = bench_config(
                root,
                protocol,
                [
                    f"train.seed={seed}",
                    f"train.device={device}",
                    f"train.run_name=bench-{protocol}-{view}-{seed}",
                    *extra,
                    *view_extra,  # last: a view's own settings win over --set
                ],
                profile=profile,
            )
            t0 = time.perf_counter()
            res = train_model(cfg, split_dir, evaluate_test=False)
            seconds = time.perf_counter() - t0
            # the published code trains a fixed number of epochs and keeps the last
            kept = res.best_checkpoint.with_name("last.pt") if view == "published" else res.best_checkpoint
            ckpt = load_checkpoint(kept)
            rows = evaluate_all(
                cfg,
                split_dir,
                {"gru4rec": GRU4RecRecommender(build_model(ckpt, device), device)},
                split="test",
                baselines=(seed == seeds[0] and view in ("shipped", "unmasked")),  # others: as unmasked
                device=device,
                vocab=ckpt.vocab,
                policy=ckpt.policy,  # the view's policy, stored in its model
            )
            row[view] = dict(rows)
            row[f"{view}_train"] = {
                "best_epoch": res.best_epoch,
                "train_seconds": seconds,
                "events_per_second": float(np.mean([h["events_per_second"] for h in res.history])),
                "valid_mrr@20": res.history[res.best_epoch - 1]["valid"]["mrr@20"],
                "history_bias": res.history[res.best_epoch - 1].get("history_bias"),  # learned, or None
                "load": load_avg(),
            }
            log(
                f"  seed {seed} {view}: best epoch {res.best_epoch}, R@20 "
                f"{rows['gru4rec']['recall@20']:.4f} MRR@20 {rows['gru4rec']['mrr@20']:.4f} "
                f"({seconds:.0f} s, load {load_avg()})"
            )
        per_seed.append(row)
    return summarize(per_seed)


def summarize(per_seed: list[dict]) -> dict:
    """Mean (and std) over seeds of the GRU metrics; baselines are deterministic, taken once."""
    summary: dict = {"seeds": [r["seed"] for r in per_seed], "per_seed": per_seed, "load": load_avg()}
    with_baselines = next(r for r in per_seed if "item-knn" in r["shipped"])
    for view in (v for v, _, _ in VIEWS if all(v in r for r in per_seed)):
        gru = [r[view]["gru4rec"] for r in per_seed]
        summary[view] = {
            "gru4rec": {
                k: float(np.mean([g[k] for g in gru])) for k in gru[0] if isinstance(gru[0][k], float)
            },
            "gru4rec_std": {
                k: float(np.std([g[k] for g in gru])) for k in ("recall@20", "mrr@20", "ndcg@10")
            },
        }
        for name in ("item-knn", "most-popular"):
            if name in with_baselines[view]:
                summary[view][name] = with_baselines[view][name]
    return summary


# Step variants timed side by side (same data, seed and settings): the autograd reference, the
# hand-written step, and the hand-written step compiled by inductor (compile time reported apart).
SPEED_VARIANTS = (
    ("plain", ["train.fast_step=false", "train.compile=false"]),
    ("fast", ["train.fast_step=true", "train.compile=false"]),
    ("fast+compile", ["train.fast_step=true", "train.compile=true"]),
)


NOT_RUN = "not run (pass --original PATH)"


def run_original(code: Path | None, split_dir: Path, cfg: Config, threads: int | None, epochs: int,
                 log) -> dict:
    """The original authors' GRU4Rec (``code``/gru4rec_pytorch.py) on the same training sequences and
    settings, in its own process (benchmarks/original_gru4rec.py); {"not_run": why} without ``code``."""
    if code is None:
        return {"not_run": NOT_RUN}
    t, m = cfg.train, cfg.model
    if t.loss != "cross_entropy" or m.embedding != "shared" or m.n_layers != 1:
        return {"not_run": "the original is driven for cross-entropy, shared embedding, one layer only"}
    cmd = [
        sys.executable, str(Path(__file__).resolve().parent / "original_gru4rec.py"),
        "--code", str(code), "--split", str(split_dir), "--epochs", str(epochs),
        "--hidden", str(m.hidden_size), "--batch-size", str(t.batch_size), "--n-sample", str(t.n_sample),
        "--learning-rate", str(t.learning_rate), "--momentum", str(t.momentum),
        "--sample-alpha", str(t.sample_alpha), "--logq", str(t.logq), "--threads", str(threads or 1),
    ]
    log(f"  original: {code / 'gru4rec_pytorch.py'} in its own process (load {load_avg()})")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the original GRU4Rec failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for e in result["epochs"]:
        log(f"  original epoch {e['epoch']}: {e['events_per_second']:,.0f} events/s, "
            f"{e['events_per_cpu_second']:,.0f} per CPU-second ({e['seconds']:.2f} s, loss {e['loss']:.4f}, "
            f"load {e['load_after']})")
    return result


def run_speed(
    split_dir: Path,
    root: Path,
    device: str,
    threads: int | None,
    log,
    epochs: int = 3,
    extra: list[str] = (),
    variants=SPEED_VARIANTS,
    original: Path | None = None,
) -> dict:
    """Training events/s per epoch, the first included, of every step variant at the fixed speed setting.

    Epoch e of every variant runs before epoch e + 1 of any (and the variants rotate their order), so
    a change of machine load hits them alike; ``uptime`` load is recorded beside each epoch. The epoch
    plan is reshuffled per epoch as in training and shared by the variants. No validation is timed.
    With ``original`` (a folder holding the original authors' gru4rec_pytorch.py), that code first
    trains the same sequences for the same number of epochs in its own process (it runs its epochs in
    one ``fit`` call, so it cannot take turns with ours; its load is recorded per epoch too).
    """
    import torch

    from recsys.data.sequences import load_sequences
    from recsys.device import resolve_device
    from recsys.model.batching import plan_epoch
    from recsys.model.gru4rec import GRU4Rec
    from recsys.model.step import SessionParallelTrainer
    from recsys.training.epochs import _cpu_threads

    vocab = Vocab.load(split_dir / "vocab.parquet")
    train = load_sequences(split_dir / "train.parquet", vocab)
    trainers, out = {}, {"variants": {}}
    speed_cfg = bench_config(root, "leave_one_out", [*SPEED_OVERRIDES, f"train.device={device}", *extra],
                             profile=None)
    out["original"] = run_original(original, split_dir, speed_cfg, threads, epochs, log)
    for name, sets in variants:
        cfg = bench_config(
            root, "leave_one_out", [*SPEED_OVERRIDES, f"train.device={device}", *extra, *sets], profile=None
        )
        dev = resolve_device(cfg.train.device)
        torch.manual_seed(0)
        model = GRU4Rec(len(vocab), cfg.model).to(dev)
        trainer = SessionParallelTrainer(model, cfg.train, vocab.counts, dev)
        with _cpu_threads(dev, threads):
            prep = trainer.prepare(cfg.train.batch_size)
        trainers[name] = trainer
        out["variants"][name] = {"settings": sets, "prepare_seconds": prep, "epochs": []}
        if prep:
            log(f"  {name}: compiled in {prep:.1f} s (load {load_avg()})")
    out |= {"device": str(dev), "threads": threads or 1, "batch_size": cfg.train.batch_size}
    for epoch in range(1, epochs + 1):
        plan = plan_epoch(train, cfg.train.batch_size, np.random.default_rng([0, epoch]))
        dplan = plan.to_torch(dev)
        names = list(trainers)
        names = names[epoch - 1 :] + names[: epoch - 1]  # rotate who goes first
        for name in names:
            load_before = load_avg()
            t0, c0 = time.perf_counter(), time.process_time()
            with _cpu_threads(dev, threads):
                loss = trainers[name].run_epoch(dplan, epoch)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            sec, cpu = time.perf_counter() - t0, time.process_time() - c0
            out["variants"][name]["epochs"].append(
                {
                    "epoch": epoch,
                    "seconds": sec,
                    "events_per_second": plan.n_events / sec,
                    # per second of this process's CPU time: less sensitive to a shared machine's load
                    "events_per_cpu_second": plan.n_events / cpu,
                    "loss": loss,
                    "steps": plan.n_steps,  # the epoch's plan: idle slots at its tail make steps vary
                    "load_before": load_before,
                    "load_after": load_avg(),
                }
            )
            log(
                f"  {name} epoch {epoch}: {plan.n_events / sec:,.0f} events/s, "
                f"{plan.n_events / cpu:,.0f} per CPU-second ({sec:.2f} s, loss {loss:.4f}, load {load_avg()})"
            )
        out["n_events"], out["n_steps"] = plan.n_events, plan.n_steps
    for v in out["variants"].values():
        for key in ("events_per_second", "events_per_cpu_second"):
            rates = [e[key] for e in v["epochs"]]
            later = float(np.mean(rates[1:])) if len(rates) > 1 else rates[0]
            v[f"first_vs_later_{key}"] = rates[0] / later
            v[f"later_epochs_{key}"] = later
    if "plain" in out["variants"]:
        for key in ("events_per_second", "events_per_cpu_second"):
            base = [e[key] for e in out["variants"]["plain"]["epochs"]]
            for v in out["variants"].values():  # per epoch ratio, then the mean: same load for both
                v[f"speedup_vs_plain_{key}"] = float(
                    np.mean([e[key] / b for e, b in zip(v["epochs"], base, strict=True)])
                )
    if "epochs" in out["original"]:
        orig = out["original"]
        for key in ("events_per_second", "events_per_cpu_second"):
            rates = [e[key] for e in orig["epochs"]]
            later = float(np.mean(rates[1:])) if len(rates) > 1 else rates[0]
            orig[f"first_vs_later_{key}"] = rates[0] / later
            for v in out["variants"].values():  # epoch e against the original's epoch e
                v[f"speedup_vs_original_{key}"] = float(
                    np.mean([e[key] / b for e, b in zip(v["epochs"], rates, strict=True)])
                )
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def synthetic_sequences(n_events: int, n_items: int, mean_length: float, seed: int = 0):
    """A SequenceSet of ``n_events`` items drawn from a Zipf-like popularity (geometric lengths >= 2),
    built directly with numpy: the GPU speed part needs 10M events in seconds, not the whole pipeline."""
    from recsys.data.sequences import SequenceSet

    rng = np.random.default_rng(seed)
    n_seq = max(1, int(n_events / mean_length))
    lengths = 2 + rng.geometric(1.0 / max(mean_length - 1, 1.0), size=n_seq)  # [S]
    lengths = lengths[np.cumsum(lengths) <= n_events]
    weights = 1.0 / np.arange(1, n_items + 1) ** 0.9  # [n_items]
    items = rng.choice(n_items, size=int(lengths.sum()), p=weights / weights.sum())  # [N]
    counts = np.bincount(items, minlength=n_items)  # [n_items]
    seqs = SequenceSet(
        items=items.astype(np.int64),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        n_context=np.zeros(len(lengths), dtype=np.int64),
        user_ids=pl.Series("user_id", np.arange(len(lengths))),
    )
    return seqs, counts


def run_speed_gpu(log, n_events: int = 10_000_000, n_items: int = 100_000, steps: int = 1500) -> dict:
    """GPU training events/s: batch 64 and 512, n_sample 2048, hidden 100; CUDA graphs and bf16 on/off,
    and the plain step for reference. Each cell times ``steps`` steps after 20 warm-up steps (which
    include the graph capture) of one epoch over ``n_events`` synthetic events."""
    import torch

    from recsys.config import TrainConfig
    from recsys.model.batching import DevicePlan, plan_epoch
    from recsys.model.gru4rec import GRU4Rec
    from recsys.model.step import SessionParallelTrainer

    if not torch.cuda.is_available():
        log("  no CUDA: GPU speed part skipped")
        return {"skipped": "no CUDA"}
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    seqs, counts = synthetic_sequences(n_events, n_items, mean_length=20.0)
    out: dict = {"device": torch.cuda.get_device_name(dev), "n_events": int(len(seqs.items)),
                 "n_items": n_items, "data_seconds": time.perf_counter() - t0, "runs": []}
    cfg0 = bench_config(Path(tempfile.gettempdir()), "leave_one_out", SPEED_OVERRIDES, profile=None)
    for batch in (64, 512):
        plan = plan_epoch(seqs, batch, np.random.default_rng(0))
        n = min(plan.n_steps, steps + 20)
        dplan = plan.to_torch(dev)
        for fast, graphs, amp in ((False, False, True), (True, False, False), (True, False, True),
                                  (True, True, False), (True, True, True)):
            tcfg = TrainConfig(**(cfg0.train.model_dump() | {
                "batch_size": batch, "n_sample": 2048, "fast_step": fast, "cuda_graphs": graphs, "amp": amp,
                "device": "cuda"}))
            torch.manual_seed(0)
            model = GRU4Rec(n_items, cfg0.model).to(dev)
            trainer = SessionParallelTrainer(model, tcfg, counts, dev)
            warm = DevicePlan(dplan.inputs[:20], dplan.targets[:20], dplan.keep[:20], dplan.active[:20],
                              dplan.all_active[:20])
            timed = DevicePlan(dplan.inputs[20:n], dplan.targets[20:n], dplan.keep[20:n],
                               dplan.active[20:n], dplan.all_active[20:n])
            trainer.run_epoch(warm, 1)
            torch.cuda.synchronize()
            start = time.perf_counter()
            loss = trainer.run_epoch(timed, 1)
            torch.cuda.synchronize()
            sec = time.perf_counter() - start
            events = int(plan.active[20:n].sum())
            row = {"batch_size": batch, "step": "fast" if fast else "plain", "cuda_graphs": graphs,
                   "bf16": amp, "events_per_second": events / sec, "steps_per_second": (n - 20) / sec,
                   "loss": loss}
            out["runs"].append(row)
            log(f"  gpu batch {batch} {row['step']} graphs={graphs} bf16={amp}: "
                f"{row['events_per_second']:,.0f} events/s")
            del trainer, model
            torch.cuda.empty_cache()
    return out


# --- report ----------------------------------------------------------------------------------------


def print_tables(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    for key, title in (
        ("accuracy", "ml-100k leave-one-out, test, full ranking, conservative ties"),
        ("temporal", "ml-latest-small temporal, test"),
        ("synthetic", "synthetic viewing logs (conf/ defaults, gap sessions) temporal, test"),
    ):
        if key not in result:
            continue
        acc = result[key]
        table = Table(title=f"{title} (mean of {len(acc['seeds'])} seeds; load {acc['load']})")
        for col in ("model", "view", "Recall@20", "MRR@20", "NDCG@10", "Recall@10", "coverage@20",
                    "ranked/targets"):
            table.add_column(col)
        for view in (v for v, _, _ in VIEWS if v in acc):
            for name in (n for n in ("gru4rec", "item-knn", "most-popular") if n in acc[view]):
                m = acc[view][name]
                table.add_row(
                    name,
                    view,
                    f"{m['recall@20']:.4f}",
                    f"{m['mrr@20']:.4f}",
                    f"{m['ndcg@10']:.4f}",
                    f"{m['recall@10']:.4f}",
                    f"{m.get('coverage@20', float('nan')):.3f}",
                    f"{m.get('n_queries', 0):,.0f}/{m.get('n_targets', 0):,.0f}",
                )
        if key == "accuracy":
            for name, views in REFERENCE.items():
                for view, m in views.items():
                    table.add_row(
                        name,
                        view,
                        f"{m['recall@20']:.3f}",
                        f"{m['mrr@20']:.3f}",
                        f"{m.get('ndcg@10', float('nan')):.3f}",
                        "",
                        "",
                        "",
                    )
        console.print(table)
        console.print("every metric is over all targets (unrankable ones count as misses); 'published' is "
                      "our code with the published GRU4Rec behaviour (docs/gru4rec-fidelity.md)")
    for key, title in (("speed", "ml-100k"), ("speed_synthetic", "synthetic")):
        if key not in result or "variants" not in result[key]:
            continue
        print_speed_table(console, result[key], title)
    if "speed_gpu" in result and "runs" in result["speed_gpu"]:
        sg = result["speed_gpu"]
        table = Table(title=f"GPU training speed ({sg['device']}, {sg['n_events']:,} synthetic events, "
                      f"{sg['n_items']:,} items, hidden 100, n_sample 2048)")
        for col in ("batch", "step", "CUDA graphs", "bf16", "events/s", "steps/s"):
            table.add_column(col)
        for r in sg["runs"]:
            table.add_row(str(r["batch_size"]), r["step"], str(r["cuda_graphs"]), str(r["bf16"]),
                          f"{r['events_per_second']:,.0f}", f"{r['steps_per_second']:,.0f}")
        console.print(table)


def print_speed_table(console, sp: dict, title: str) -> None:
    """One row per step: the original authors' code, then ours (plain, fast, fast+compile), side by side."""
    from rich.table import Table

    n_epochs = len(next(iter(sp["variants"].values()))["epochs"])
    table = Table(
        title=f"training speed, {title}: events/s per epoch, hidden 100, batch 64, n_sample 512, "
        f"cross-entropy, shared embedding, {sp['threads']} thread(s), {sp['device']}"
    )
    for col in ("step", *(f"epoch {i + 1}" for i in range(n_epochs)), "per CPU-s (mean)", "first/later",
                "vs original", "vs original /CPU-s", "vs plain", "loss per epoch", "load (1 min) per epoch"):
        table.add_column(col)
    orig = sp.get("original", {"not_run": NOT_RUN})
    if "epochs" in orig:
        rows = [("original (authors' code)", orig)]
    else:
        table.add_row("original (authors' code)", orig["not_run"], *[""] * (n_epochs + 6))
        rows = []
    rows += list(sp["variants"].items())
    for name, v in rows:
        eps = v["epochs"]
        ratio = lambda k, v=v: f"{v[k]:.2f}x" if k in v else ""  # noqa: E731
        table.add_row(
            name,
            *(f"{e['events_per_second']:,.0f}" for e in eps),
            f"{np.mean([e['events_per_cpu_second'] for e in eps]):,.0f}",
            f"{v['first_vs_later_events_per_second']:.2f}",
            "1.00x" if v is orig else ratio("speedup_vs_original_events_per_second"),
            "1.00x" if v is orig else ratio("speedup_vs_original_events_per_cpu_second"),
            ratio("speedup_vs_plain_events_per_second"),
            " / ".join(f"{e['loss']:.4f}" for e in eps),
            " / ".join(e["load_after"].split()[0] for e in eps),
        )
    console.print(table)
    compiled = {n: v["prepare_seconds"] for n, v in sp["variants"].items() if v["prepare_seconds"]}
    console.print(
        f"{sp['n_events']:,} events, {sp['n_steps']:,} steps in the last epoch; compile (before epoch 1): "
        + (", ".join(f"{n} {s:.1f} s" for n, s in compiled.items()) or "none")
        + f"; peak RSS {sp['peak_rss_mb']:.0f} MB; target >= 50,000 events/s and >= 2x the original, "
        "first epoch within 10%. The original ran its epochs first, in its own process (one fit call)."
    )


def merge(files: list[Path], out: Path) -> None:
    """Merge separately run parts/seeds: per-seed rows are pooled and re-summarised."""
    result: dict = {}
    for file in files:
        part = json.loads(file.read_text())
        for key, value in part.items():
            if key in ("accuracy", "temporal", "synthetic") and key in result:
                result[key] = summarize(result[key]["per_seed"] + value["per_seed"]) | {
                    "load": f"{result[key]['load']} / {value['load']}"
                }
            else:
                result.setdefault(key, value)
                if key in ("accuracy", "temporal", "synthetic", "speed"):
                    result[key] = value
    out.write_text(json.dumps(result, indent=2, default=str))
    print_tables(result)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="accuracy,speed,temporal,synthetic", help="also: speed-gpu")
    parser.add_argument("--synthetic-events", type=int, default=300_000, help="size of the synthetic set")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--speed-epochs", type=int, default=3, help="epochs per step variant (speed)")
    parser.add_argument("--gpu-events", type=int, default=10_000_000, help="synthetic events (speed-gpu)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--split-source",
        default="direct",
        choices=["direct", "pipeline"],
        help="direct: file-order timestamp ties (the reference run's protocol); pipeline: recsys stages",
    )
    parser.add_argument("--set", dest="sets", action="append", default=[], help="extra config override")
    parser.add_argument(
        "--original",
        type=Path,
        default=None,
        help="speed: folder holding the original authors' gru4rec_pytorch.py (docs/training-speed.md)",
    )
    parser.add_argument("--seed-list", default=None, help="e.g. 2,3 (default: 1..--seeds)")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="*",
        default=None,
        help="combine result files of separate runs (e.g. one per part or seed) into --out",
    )
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.out)
        return
    parts = set(args.part.split(","))
    seeds = [int(x) for x in args.seed_list.split(",")] if args.seed_list else list(range(1, args.seeds + 1))
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    result: dict = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_start": load_avg(),
        "profile": PROFILE,
        "profile_settings": (REPO / "conf" / "profiles" / f"{PROFILE}.yaml").read_text(),
        "extra_overrides": args.sets,
        "git": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip(),
    }
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        if parts & {"accuracy", "speed"}:
            root = Path(tmp) / "ml100k"
            split_dir, how = prepare_split("ml-100k", "leave_one_out", args.data, root, args.split_source)
            result["split_ml100k"] = how
            if "speed" in parts:
                log(f"speed ml-100k (load {load_avg()})")
                result["speed"] = run_speed(
                    split_dir, root, args.device, args.threads, log, args.speed_epochs, args.sets,
                    original=args.original,
                )
            if "accuracy" in parts:
                log(f"accuracy ml-100k leave-one-out (load {load_avg()})")
                result["accuracy"] = run_accuracy(
                    split_dir, root, "leave_one_out", seeds, args.device, log, args.sets
                )
        if "temporal" in parts:
            root = Path(tmp) / "mlsmall"
            split_dir, how = prepare_split("ml-latest-small", "temporal", args.data, root, args.split_source)
            result["split_mlsmall"] = how
            log(f"temporal ml-latest-small (load {load_avg()})")
            result["temporal"] = run_accuracy(
                split_dir, root, "temporal", seeds, args.device, log, args.sets
            )
        if "speed" in parts:
            root = Path(tmp) / "speed_synthetic"
            split_dir = prepare_synthetic(root, args.synthetic_events)
            log(f"speed synthetic, {args.synthetic_events:,} generated events (load {load_avg()})")
            result["speed_synthetic"] = run_speed(
                split_dir, root, args.device, args.threads, log, args.speed_epochs, args.sets,
                original=args.original,
            )
        if "speed-gpu" in parts:
            log(f"speed GPU (load {load_avg()})")
            result["speed_gpu"] = run_speed_gpu(log, args.gpu_events)
        if "synthetic" in parts:
            root = Path(tmp) / "synthetic"
            split_dir = prepare_synthetic(root, args.synthetic_events)
            result["split_synthetic"] = f"recsys generate ({args.synthetic_events:,} events) -> pipeline"
            log(f"temporal synthetic (load {load_avg()})")
            result["synthetic"] = run_accuracy(
                split_dir, root, "temporal", seeds, args.device, log, args.sets, profile=None
            )
    result["load_end"] = load_avg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print_tables(result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
