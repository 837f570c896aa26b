"""Effect of each difference from the published GRU4Rec, one setting at a time (docs/gru4rec-fidelity.md).

    .venv/bin/python benchmarks/bench_fidelity.py [--datasets ml-100k,synthetic] [--seeds 1] [--epochs 5]
        [--synthetic-events 100000]

Every variant trains on the same split with the same seed and differs from the base in one setting
(the last row sets all of them: our code with the published behaviour). No early stopping, no refit,
the last epoch is tested, nothing is masked at ranking (the published protocol). Prints a table and
writes ``benchmarks/results/bench_fidelity.json`` with the machine load beside every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import DEFAULT_DATA, bench_config, prepare_split, prepare_synthetic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_fidelity.json"
# The published protocol around every variant: fixed epochs (last kept), nothing masked, no history bias.
PROTOCOL = ["policy.exclude=none", "model.history_bias=false", "train.refit=false", "train.patience=1000",
            "train.mask_seen_negatives=false"]
# (name, overrides) one difference at a time; logQ and state dropout only act when their base is on.
VARIANTS = (
    ("ours (base)", []),
    ("epoch_order=start_time", ["train.epoch_order=start_time"]),
    ("mask_duplicate_targets=false", ["train.mask_duplicate_targets=false"]),
    ("logq=1 (ours: every column by popularity^alpha)", ["train.logq=1.0"]),
    ("logq=1, logq_targets=count (published)", ["train.logq=1.0", "train.logq_targets=count"]),
    ("dropout_hidden=0.25", ["model.dropout_hidden=0.25"]),
    ("dropout_hidden=0.25, dropout_state (published)",
     ["model.dropout_hidden=0.25", "model.dropout_state=true"]),
    ("all published settings", ["train.epoch_order=start_time", "train.mask_duplicate_targets=false",
                                "train.logq_targets=count", "model.dropout_state=true"]),
)


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run(split_dir: Path, root: Path, profile: str | None, seeds: list[int], epochs: int, log,
        variants: list[int] | None = None) -> list[dict]:
    from recsys.model.checkpoint import build_model, load_checkpoint
    from recsys.model.recommender import GRU4RecRecommender
    from recsys.training.evaluate import evaluate_all
    from recsys.training.train import train_model

    rows = []
    for i, (name, extra) in enumerate(VARIANTS):
        if variants is not None and i not in variants:
            continue
        metrics = []
        for seed in seeds:
            cfg = bench_config(root, "temporal", [*PROTOCOL, f"train.epochs={epochs}", f"train.seed={seed}",
                                                  "train.device=cpu", f"train.run_name=fid-{seed}", *extra],
                               profile=profile)
            t0 = time.perf_counter()
            res = train_model(cfg, split_dir, evaluate_test=False)
            ckpt = load_checkpoint(res.best_checkpoint.with_name("last.pt"))  # the last epoch, as published
            rec = GRU4RecRecommender(build_model(ckpt), "cpu")
            test = evaluate_all(cfg, split_dir, {"gru4rec": rec}, split="test", baselines=False,
                                vocab=ckpt.vocab, policy=ckpt.policy)["gru4rec"]
            metrics.append(test)
            log(f"  {name} seed {seed}: R@20 {test['recall@20']:.4f} MRR@20 {test['mrr@20']:.4f} "
                f"({time.perf_counter() - t0:.0f} s, load {load_avg()})")
        rows.append({"variant": name, "overrides": extra, "load": load_avg(),
                     **{k: float(np.mean([m[k] for m in metrics])) for k in ("recall@20", "mrr@20")},
                     "n_targets": metrics[0]["n_targets"], "n_ranked": metrics[0]["n_queries"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="ml-100k,synthetic")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--synthetic-events", type=int, default=100_000)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--variants", default=None, help="indices into VARIANTS, e.g. 0,3,4 (default: all)")
    args = parser.parse_args()
    chosen = [int(v) for v in args.variants.split(",")] if args.variants else None
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    seeds = list(range(1, args.seeds + 1))
    result: dict = {"created_at": datetime.now(UTC).isoformat(timespec="seconds"), "load_start": load_avg(),
                    "epochs": args.epochs, "seeds": seeds, "protocol": PROTOCOL}
    with tempfile.TemporaryDirectory(prefix="bench_fidelity_") as tmp:
        for dataset in args.datasets.split(","):
            root = Path(tmp) / dataset
            if dataset == "ml-100k":  # leave-one-out, the movielens profile's hyperparameters
                split_dir, _ = prepare_split("ml-100k", "leave_one_out", args.data, root, "direct")
                profile = "movielens"
            else:  # the synthetic viewing logs, conf/ defaults (gap sessions, temporal split)
                split_dir, profile = prepare_synthetic(root, args.synthetic_events), None
            log(f"{dataset} (load {load_avg()})")
            result[dataset] = run(split_dir, root, profile, seeds, args.epochs, log, chosen)
    result["load_end"] = load_avg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for dataset in args.datasets.split(","):
        print(f"\n{dataset}: {args.epochs} epochs, seeds {seeds}, last epoch, unmasked, "
              "metrics over all targets")
        print(f"{'variant':50s} {'R@20':>7s} {'MRR@20':>7s}  load")
        for row in result[dataset]:
            print(f"{row['variant']:50s} {row['recall@20']:7.4f} {row['mrr@20']:7.4f}  {row['load']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
