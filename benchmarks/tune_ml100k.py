"""Hand-sized hyper-parameter search for ml-100k leave-one-out, scored on the VALIDATION split only.

    .venv/bin/python benchmarks/tune_ml100k.py '' 'train.loss=bpr_max train.n_sample=2048' '...'
    SEEDS=1,2,3,4,5 .venv/bin/python benchmarks/tune_ml100k.py 'train.sample_alpha=0.0'

Each argument is one trial: space-separated overrides on top of the ``movielens`` profile
(conf/profiles/movielens.yaml; '' = the profile as it ships). Every trial trains once per seed
(``$SEEDS``, default 1,2,3: single-seed differences on 943 validation users are mostly noise) and prints
the mean validation Recall@20 / MRR@20 (seen items masked, the protocol's default), each seed's MRR@20
and best epoch. The test split is never read.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import DEFAULT_DATA, bench_config, load_avg, prepare_split  # noqa: E402

from recsys.training.train import train_model  # noqa: E402


def main() -> None:
    source = os.environ.get("SPLIT_SOURCE", "direct")
    seeds = [int(s) for s in os.environ.get("SEEDS", "1,2,3").split(",")]
    root = Path("/tmp") / f"tune_ml100k_{source}"
    split_dir = root / "split"
    if not (split_dir / "vocab.parquet").exists():
        split_dir, _ = prepare_split("ml-100k", "leave_one_out", DEFAULT_DATA, root, source)
    for trial in sys.argv[1:]:
        t0 = time.perf_counter()
        best = []
        for seed in seeds:
            sets = [*trial.split(), "train.run_name=tune", f"train.seed={seed}"]
            cfg = bench_config(root, "leave_one_out", sets)
            ckpt = root / f"ckpt-{os.getpid()}"
            res = train_model(cfg, split_dir, checkpoint_dir=ckpt, evaluate_test=False)
            best.append((res.history[res.best_epoch - 1]["valid"], res.best_epoch))
        mrr = [v["mrr@20"] for v, _ in best]
        print(
            f"{trial!r}: valid R@20 {np.mean([v['recall@20'] for v, _ in best]):.4f} "
            f"MRR@20 {np.mean(mrr):.4f} | seeds {seeds} MRR@20 {' '.join(f'{m:.4f}' for m in mrr)} "
            f"best epochs {[e for _, e in best]} | {time.perf_counter() - t0:.0f} s, load {load_avg()}",
            flush=True,
        )


if __name__ == "__main__":
    main()
