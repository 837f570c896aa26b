"""Hand-sized hyper-parameter search for ml-100k leave-one-out, scored on the VALIDATION split only.

    .venv/bin/python benchmarks/tune_ml100k.py 'train.loss=bpr_max train.n_sample=2048' '...'

Each argument is one trial (space-separated overrides on top of ML100K_OVERRIDES in bench_train.py);
prints validation Recall@20 / MRR@20 (seen items masked, as the protocol's default) and the best epoch.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import DEFAULT_DATA, ML100K_OVERRIDES, bench_config, load_avg, prepare_split  # noqa: E402

from recsys.train import train_model  # noqa: E402


def main() -> None:
    source = os.environ.get("SPLIT_SOURCE", "direct")
    root = Path("/tmp") / f"tune_ml100k_{source}"
    split_dir = root / "split"
    if not (split_dir / "vocab.parquet").exists():
        split_dir, _ = prepare_split("ml-100k", "leave_one_out", DEFAULT_DATA, root, source)
    for trial in sys.argv[1:]:
        cfg = bench_config(root, "leave_one_out", ML100K_OVERRIDES, trial.split() + ["train.run_name=tune"])
        t0 = time.perf_counter()
        res = train_model(cfg, split_dir, checkpoint_dir=root / f"ckpt-{os.getpid()}", evaluate_test=False)
        curve = " ".join(f"{h['valid']['mrr@20']:.4f}" for h in res.history)
        best = res.history[res.best_epoch - 1]["valid"]
        print(
            f"{trial!r}: valid R@20 {best['recall@20']:.4f} MRR@20 {best['mrr@20']:.4f} "
            f"epoch {res.best_epoch} "
            f"[{curve}] {time.perf_counter() - t0:.0f}s load {load_avg()}",
            flush=True,
        )


if __name__ == "__main__":
    main()
