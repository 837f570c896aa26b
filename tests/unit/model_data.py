"""Tiny split directories for the model tests (written in the split file contract, no pipeline needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from recsys.data.vocab import Vocab


def write_split_dir(out: Path, sequences: list[list[int]], holdout: int = 2) -> Path:
    """Leave-one-out split of whole sequences: train = all but the last ``holdout`` items, valid and test
    predict the last two items with the rest as context (like the leave_one_out protocol)."""
    out.mkdir(parents=True, exist_ok=True)
    users = [f"u{i}" for i in range(len(sequences))]
    train = [s[:-2] for s in sequences]
    valid = [s[:-1] for s in sequences]
    schema = {"user_id": pl.String, "items": pl.List(pl.Int64), "n_context": pl.Int32}
    pl.DataFrame(
        {"user_id": users, "items": train, "n_context": [0] * len(users)}, schema=schema
    ).write_parquet(out / "train.parquet")
    pl.DataFrame(
        {"user_id": users, "items": valid, "n_context": [len(s) - 2 for s in sequences]}, schema=schema
    ).write_parquet(out / "valid.parquet")
    pl.DataFrame(
        {"user_id": users, "items": sequences, "n_context": [len(s) - 1 for s in sequences]}, schema=schema
    ).write_parquet(out / "test.parquet")
    Vocab.from_items(pl.Series("item_id", [i for s in train for i in s], dtype=pl.Int64)).save(
        out / "vocab.parquet"
    )
    return out


def cyclic_sequences(n_seq: int = 60, n_items: int = 30, length: int = 14, seed: int = 0) -> list[list[int]]:
    """Sequences walking a fixed random cycle of items: the next item is predictable, popularity is flat."""
    rng = np.random.default_rng(seed)
    cycle = rng.permutation(n_items)
    nxt = {int(cycle[i]): int(cycle[(i + 1) % n_items]) for i in range(n_items)}
    seqs = []
    for _ in range(n_seq):
        item = int(rng.integers(n_items))
        seq = [item]
        for _ in range(length - 1):
            item = nxt[item] if rng.random() < 0.9 else int(rng.integers(n_items))
            seq.append(item)
        seqs.append(seq)
    return seqs
