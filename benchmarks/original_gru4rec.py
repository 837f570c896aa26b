"""Time the original authors' PyTorch GRU4Rec on our training sequences (one thread, CPU), for bench_train.

    .venv/bin/python benchmarks/original_gru4rec.py --code DIR --split SPLIT_DIR [--epochs 3] [--out FILE]

``DIR`` holds ``gru4rec_pytorch.py`` from the public repository hidasib/GRU4Rec_PyTorch_Official (not
part of this project: clone it yourself, see docs/training-speed.md). This driver is ours: it imports that
module, builds the pandas frame it expects (SessionId, ItemId, Time) from the same training sequences
our trainer uses (``train.parquet`` of the split, item indices from its vocabulary, sequences of one
item dropped as our batching drops them, so both see the same events), and calls ``GRU4Rec.fit`` with
the settings given on the command line. bench_train runs it in a subprocess, so the two codes never
share a process (threads, allocator, inductor state).

Initialisation: ``fit(compatibility_mode=False)``, the module's own torch initialisation. Its default
compatibility mode (numpy-drawn weights) fails under NumPy 2, where float32 times a numpy float64
scalar is float64 and ``Tensor.set_`` then refuses the dtype; the initialisation does not change the
work per step.

Timing: the published ``fit`` prints each epoch's seconds (two decimals). To time the epoch loop to the
microsecond and in CPU seconds too, the driver wraps the module's session iterator: the clock starts
when an epoch asks for its first mini-batch and stops when the iterator is exhausted, i.e. the whole
forward/backward/update loop of the epoch. Both figures are written; events per epoch = sum over
sequences of (length - 1), the events our trainer counts. Prints one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODULE = "gru4rec_pytorch.py"
EPOCH_LINE = re.compile(r"Epoch(\d+) --> loss: ([0-9.naninf]+) \t\(([0-9.]+)s\)")


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def load_module(code_dir: Path):
    """Import ``gru4rec_pytorch.py`` from ``code_dir`` under a private name (never from our package)."""
    path = code_dir / MODULE
    if not path.is_file():
        raise SystemExit(
            f"{path}: not found (clone hidasib/GRU4Rec_PyTorch_Official, see docs/training-speed.md)"
        )
    spec = importlib.util.spec_from_file_location("original_gru4rec_pytorch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def session_frame(split_dir: Path):
    """(pandas frame of SessionId, ItemId, Time; events trained on per epoch) from ``train.parquet``.

    ItemId is our vocabulary index; Time is the event's position in the file, so the original's
    session order (by first event time) is the file's sequence order.
    """
    import pandas as pd

    from recsys.data.sequences import load_sequences
    from recsys.data.vocab import Vocab

    seqs = load_sequences(split_dir / "train.parquet", Vocab.load(split_dir / "vocab.parquet"))
    lengths = seqs.lengths  # [S]
    keep = np.repeat(lengths >= 2, lengths)  # [N] sequences with at least one (input, target) pair
    session = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)  # [N]
    frame = pd.DataFrame(
        {
            "SessionId": session[keep],
            "ItemId": seqs.items[keep].astype(np.int64),
            "Time": np.arange(len(seqs.items), dtype=np.int64)[keep],
        }
    )
    return frame, int((lengths[lengths >= 2] - 1).sum())


def time_epochs(module) -> list[dict]:
    """Wrap the module's session iterator so every epoch's loop is timed (wall and this process's CPU)."""
    epochs: list[dict] = []
    original_call = module.SessionDataIterator.__call__

    def timed_call(self, *args, **kwargs):
        load_before = load_avg()
        t0, c0 = time.perf_counter(), time.process_time()
        n = 0
        for batch in original_call(self, *args, **kwargs):
            n += 1
            yield batch
        epochs.append({
            "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, "mini_batches": n,
            "load_before": load_before, "load_after": load_avg(),
        })

    module.SessionDataIterator.__call__ = timed_call
    return epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", type=Path, required=True, help="folder holding gru4rec_pytorch.py")
    parser.add_argument("--split", type=Path, required=True, help="holds train.parquet, vocab.parquet")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-sample", type=int, default=512)
    parser.add_argument("--loss", default="cross-entropy", choices=["cross-entropy", "bpr-max"])
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--sample-alpha", type=float, default=0.5)
    parser.add_argument("--logq", type=float, default=0.0)
    parser.add_argument("--bpreg", type=float, default=1.0)
    parser.add_argument("--elu-param", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    module = load_module(args.code)
    frame, n_events = session_frame(args.split)
    epochs = time_epochs(module)
    gru = module.GRU4Rec(
        layers=[args.hidden], loss=args.loss, batch_size=args.batch_size, dropout_p_embed=0.0,
        dropout_p_hidden=0.0, learning_rate=args.learning_rate, momentum=args.momentum,
        sample_alpha=args.sample_alpha, n_sample=args.n_sample, embedding=0, constrained_embedding=True,
        n_epochs=args.epochs, bpreg=args.bpreg, elu_param=args.elu_param, logq=args.logq,
        device=torch.device("cpu"),
    )
    printed = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(printed):
        gru.fit(frame, compatibility_mode=False)  # see the module docstring
    fit_seconds = time.perf_counter() - t0
    lines = printed.getvalue()
    reported = {int(m[1]): (float(m[2]), float(m[3])) for m in EPOCH_LINE.finditer(lines)}
    if getattr(gru, "error_during_train", False) or len(epochs) != args.epochs:
        raise SystemExit(f"the original code did not finish {args.epochs} epochs:\n{lines}")
    for i, e in enumerate(epochs, start=1):
        loss, seconds = reported.get(i, (float("nan"), float("nan")))
        e |= {
            "epoch": i,
            "events_per_second": n_events / e["seconds"],
            "events_per_cpu_second": n_events / e["cpu_seconds"],
            "loss": loss,  # the original's own per-epoch mean loss
            "printed_seconds": seconds,  # the original's own clock (2 decimals), a cross-check
        }
    result = {
        "code": str((args.code / MODULE).resolve()),
        "n_events": n_events,
        "n_items": int(frame["ItemId"].nunique()),
        "n_sessions": int(frame["SessionId"].nunique()),
        "threads": torch.get_num_threads(),
        "fit_seconds": fit_seconds,  # includes the original's set-up (sorting, sample cache)
        "settings": {k: v for k, v in vars(args).items() if k not in ("code", "split", "out")},
        "epochs": epochs,
    }
    text = json.dumps(result, default=str)
    if args.out is not None:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
