"""Checkpoints that load with ``torch.load(weights_only=True)``: tensors, plain lists, dicts and strings.

The configuration travels as its JSON dump and the vocabulary as plain lists (original ids, counts), so a
checkpoint is self-contained for scoring (the pyfunc model ships exactly this file) and never unpickles
arbitrary objects. Writes are atomic: a temporary file in the same directory, then ``os.replace``.
The stored configuration is the redacted one (:func:`recsys.config.recorded_config`): a checkpoint
travels (registry, pyfunc) and must never carry a credential.
"""

from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import torch

from recsys.config import Config, recorded_config
from recsys.data.vocab import Vocab
from recsys.model.gru4rec import GRU4Rec
from recsys.model.policy import Policy
from recsys.schemas import COUNT, IDX, ITEM_ID, VOCAB_IDX_DTYPE

FORMAT_VERSION = 1
ID_DTYPES = {"Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64", "String"}


class CheckpointError(ValueError):
    """A file that is not a loadable checkpoint; the message is one line naming the file."""


@dataclass
class Checkpoint:
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    config: Config
    vocab: Vocab
    epoch: int
    metrics: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    policy: Policy = field(default_factory=Policy)  # the recommendation rules it was trained and gated with

    @property
    def n_items(self) -> int:
        return len(self.vocab)


def _vocab_to_plain(vocab: Vocab) -> dict[str, Any]:
    ids = vocab.item_ids
    kind = type(ids.dtype).__name__ if ids.dtype.is_integer() else "String"  # e.g. "Int64", "UInt32"
    return {
        "item_ids": ids.cast(pl.String).to_list() if kind == "String" else ids.to_list(),
        "id_dtype": kind,
        "counts": torch.from_numpy(vocab.counts.astype("int64")),
    }


def _vocab_from_plain(data: dict[str, Any]) -> Vocab:
    if data["id_dtype"] not in ID_DTYPES:
        raise ValueError(f"checkpoint vocabulary has unsupported id dtype {data['id_dtype']!r}")
    dtype = getattr(pl, data["id_dtype"])
    ids = pl.Series(ITEM_ID, data["item_ids"], dtype=dtype)
    frame = pl.DataFrame(
        {
            ITEM_ID: ids,
            IDX: pl.Series(IDX, range(len(ids)), dtype=VOCAB_IDX_DTYPE),
            COUNT: pl.Series(COUNT, data["counts"].tolist(), dtype=pl.Int64),
        }
    )
    return Vocab(frame)


def save_checkpoint(
    path: Path,
    *,
    model: GRU4Rec,
    optimizer: Any | None,
    config: Config,
    vocab: Vocab,
    epoch: int,
    metrics: dict[str, Any],
    extra: dict[str, Any] | None = None,
    policy: Policy | None = None,
) -> Path:
    """Write atomically; ``optimizer`` is anything with ``state_dict()`` (ours returns tensors/lists).

    ``policy`` (what the model may recommend) travels with the weights: every stage ranks with it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer_state": _to_cpu(optimizer.state_dict()) if optimizer is not None else None,
        "config": recorded_config(config),
        "vocab": _vocab_to_plain(vocab),
        "epoch": int(epoch),
        "metrics": metrics,
        "extra": _to_cpu(extra or {}),
        "policy": (policy or Policy()).to_plain(),
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # full disk, read-only or quota: torch reports a RuntimeError
        reason = getattr(exc, "strerror", None) or (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise OSError(getattr(exc, "errno", None) or 0, f"could not write the checkpoint ({reason}); the "
                      "previous one is intact", str(path)) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_cpu(v) for v in obj]
    return obj


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint with ``weights_only=True`` (no arbitrary unpickling).

    Anything else (a pickle that would run code, a truncated or foreign file) is a one-line
    :class:`CheckpointError` naming the file; it is never loaded another way.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch's notes on foreign pickles: the error below says it all
            warnings.simplefilter("ignore", UserWarning)
            data = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: refused: not a weights-only checkpoint (it holds Python objects "
                              "that loading would execute)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        version = data.get("format_version") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path}: unsupported checkpoint format {version!r}")
    config, legacy = _migrate_config(data["config"])
    policy = Policy.from_plain(data["policy"]) if data.get("policy") else Policy.masking(legacy)
    return Checkpoint(
        model_state=data["model_state"],
        optimizer_state=data["optimizer_state"],
        config=config,
        vocab=_vocab_from_plain(data["vocab"]),
        epoch=int(data["epoch"]),
        metrics=data["metrics"],
        extra=data.get("extra") or {},
        policy=policy,
    )


def non_finite_weights(ckpt: Checkpoint) -> list[str]:
    """Names of the model tensors holding NaN or infinity (a diverged model must never be served)."""
    return [name for name, tensor in ckpt.model_state.items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def _migrate_config(tree: dict[str, Any]) -> tuple[Config, bool]:
    """A checkpoint written before the policy existed: drop the per-stage ``exclude_seen`` flags (the
    scoring one, default on, becomes its policy) so the config still validates."""
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    legacy = bool((tree.get("score") or {}).pop("exclude_seen", True))
    (tree.get("evaluate") or {}).pop("exclude_seen", None)
    return Config.model_validate(tree), legacy


def build_model(ckpt: Checkpoint, device: str | torch.device = "cpu") -> GRU4Rec:
    """The checkpoint's network on ``device``, in eval mode."""
    model = GRU4Rec(ckpt.n_items, ckpt.config.model)
    model.load_state_dict(ckpt.model_state)
    return model.to(device).eval()
