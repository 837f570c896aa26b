"""Tiny worlds for the MLflow tests: a split directory, a config whose embedded SQLite store lives in a
temp dir, and checkpoints trained with the real ``train_model`` (seconds, hidden size 8)."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
from model_data import cyclic_sequences, write_split_dir

from recsys.config import Config, load_config
from recsys.model.checkpoint import load_checkpoint, save_checkpoint
from recsys.model.gru4rec import GRU4Rec


def make_config(root: Path, **sections: dict) -> Config:
    """Config for a fresh data root; the store is the embedded default, named explicitly so that an
    ``$MLFLOW_TRACKING_URI`` in the environment cannot send test runs elsewhere."""
    values = {
        "paths": {"data_root": str(root)},
        "model": {"hidden_size": 8},
        "train": {"epochs": 1, "n_sample": 16, "batch_size": 8, "device": "cpu", "patience": 5},
        "tracking": {"tracking_uri": f"sqlite:///{(root / 'mlflow' / 'mlflow.db').resolve()}",
                     "retry_window_seconds": 0.2, "retry_backoff_seconds": 0.05},
    }
    for section, extra in sections.items():
        values[section] = {**values.get(section, {}), **extra}
    return load_config(values=values)


def make_world(root: Path, **sections: dict) -> Config:
    config = make_config(root, **sections)
    write_split_dir(config.paths.split_dir, cyclic_sequences())
    return config


def train_checkpoint(config: Config, name: str, epochs: int) -> Path:
    """``train_model`` into checkpoints/<name>/ and return its best.pt."""
    from recsys.training.train import train_model

    trial = config.model_copy(deep=True)
    trial.train.epochs = epochs
    result = train_model(trial, checkpoint_dir=config.paths.checkpoints_dir / name, evaluate_test=False)
    return result.best_checkpoint


def constant_checkpoint(source: Path, out: Path) -> Path:
    """The source checkpoint with a zero output layer: every item scores the same, so (ties counted
    conservatively) no target is ever ranked: worse than most-popular."""
    ckpt = load_checkpoint(source)
    model = GRU4Rec(ckpt.n_items, ckpt.config.model)
    state = {k: (torch.zeros_like(v) if k.startswith("item_out") or k.startswith("item_bias") else v)
             for k, v in ckpt.model_state.items()}
    model.load_state_dict(state)
    return save_checkpoint(out, model=model, optimizer=None, config=ckpt.config, vocab=ckpt.vocab,
                           epoch=ckpt.epoch, metrics={}, policy=ckpt.policy)


def copy_checkpoint(source: Path, out: Path) -> Path:
    """The same model saved as another file (other bytes): registering it makes a new version, while
    registering the same file again returns the version it already has."""
    ckpt = load_checkpoint(source)
    model = GRU4Rec(ckpt.n_items, ckpt.config.model)
    model.load_state_dict(ckpt.model_state)
    return save_checkpoint(out, model=model, optimizer=None, config=ckpt.config, vocab=ckpt.vocab,
                           epoch=ckpt.epoch, metrics=ckpt.metrics, extra={**ckpt.extra, "copy_of": out.name})


def free_port() -> int:
    """A loopback port nothing listens on (bound then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
