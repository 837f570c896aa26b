"""The GRU4Rec model as an MLflow pyfunc: histories of original item ids in, top-K item ids out.

The packaged model holds no pickled Python object. Its one artifact is the training checkpoint
(state_dict + vocabulary + config, read with ``torch.load(weights_only=True)``), the class is loaded as
"models from code" (``pyfunc_entry.py``) and the ``recsys`` package travels in the model's ``code/``
folder, so a model logged on a GPU box loads on a CPU-only one and vice versa (tensors are mapped to
the loading device).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import polars as pl
import torch

from recsys.data.vocab import Vocab
from recsys.model.policy import Policy, apply_policy

logger = logging.getLogger(__name__)

CHECKPOINT_ARTIFACT = "checkpoint"  # key in the pyfunc's artifacts
CHECKPOINT_FILE = "checkpoint.pt"  # its file name: <model dir>/artifacts/checkpoint.pt
ENTRY_FILE = Path(__file__).with_name("pyfunc_entry.py")
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # recsys/
DEFAULT_TOP_K = 20
USER_BATCH = 1024  # users scored against the full catalogue at once


def _pip_requirements() -> list[str]:
    """Pinned to what is installed: inferring requirements costs 10-36 s per log (STACK-NOTES)."""
    from importlib import metadata

    names = ("mlflow", "torch", "numpy", "pandas", "polars", "pyarrow", "pydantic", "pyyaml")
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def histories_to_batch(
    histories: Sequence[Sequence[Any]], vocab: Vocab, max_history: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded index matrix [U, L] and lengths [U] of the known items of each history.

    Unknown items are skipped; only the last ``max_history`` known items are kept.
    """
    lists = [list(h) if h is not None else [] for h in histories]
    sizes = np.array([len(h) for h in lists], dtype=np.int64)
    flat = [item for h in lists for item in h]
    if flat:
        idx = vocab.index_of(pl.Series(flat, dtype=vocab.item_ids.dtype, strict=False))  # -1: unknown
    else:
        idx = np.empty(0, np.int64)
    row = np.repeat(np.arange(len(lists)), sizes)
    known = idx >= 0
    idx, row = idx[known], row[known]
    lengths = np.bincount(row, minlength=len(lists)).astype(np.int64)  # [U]
    if max_history is not None:
        # position of each kept item counted from the end of its history
        ends = np.cumsum(lengths)
        from_end = np.repeat(ends, lengths) - np.arange(len(idx)) - 1
        keep = from_end < max_history
        idx, row, from_end = idx[keep], row[keep], from_end[keep]
        lengths = np.minimum(lengths, max_history)
    width = max(int(lengths.max()) if len(lengths) else 0, 1)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    col = np.arange(len(idx)) - starts
    items = np.zeros((len(lists), width), dtype=np.int64)  # [U, L]
    items[row, col] = idx
    return torch.from_numpy(items), torch.from_numpy(lengths)


@torch.no_grad()
def recommend(
    model: torch.nn.Module,
    vocab: Vocab,
    user_ids: Sequence[Any],
    histories: Sequence[Sequence[Any]],
    *,
    top_k: int = DEFAULT_TOP_K,
    policy: Policy | None = None,
    exclude_seen: bool | None = None,
    max_history: int | None = None,
    device: str | torch.device = "cpu",
) -> pd.DataFrame:
    """Top-``top_k`` items per user: ``user_id, rank, item_id, score, source``.

    ``source`` is ``model``, or ``popular`` for a user none of whose history items the model knows (the
    training-count ranking, score = count). ``policy`` (the model's stored one; ``exclude_seen`` is the
    shorthand for plain masking on/off) decides which history items are excluded; every history item
    counts as a finished watch. A model trained with ``model.history_bias`` adds its learned offset to
    the history items the policy keeps.
    """
    if policy is None:
        policy = Policy.masking(True if exclude_seen is None else exclude_seen)
    n_items = len(vocab)
    k = max(1, min(int(top_k), n_items))
    items, lengths = histories_to_batch(histories, vocab, max_history)
    item_ids = vocab.item_ids.to_numpy()
    popularity = torch.from_numpy(vocab.counts.astype(np.float32))  # [N]
    out_idx = np.zeros((len(user_ids), k), dtype=np.int64)
    out_score = np.full((len(user_ids), k), np.nan, dtype=np.float32)
    for lo in range(0, len(user_ids), USER_BATCH):
        hi = min(lo + USER_BATCH, len(user_ids))
        batch, lens = items[lo:hi].to(device), lengths[lo:hi].to(device)
        has = lens > 0  # [b]
        scores = popularity.to(device).unsqueeze(0).repeat(hi - lo, 1)  # [b, N]
        if has.any():
            states = model.final_states(batch[has], lens[has])  # [b', H]
            scores[has] = model.score_items(states).float()  # [b', N]
        rows = torch.arange(hi - lo, device=device).unsqueeze(1).expand_as(batch)  # [b, L]
        valid = torch.arange(batch.shape[1], device=device).unsqueeze(0) < lens.unsqueeze(1)  # [b, L]
        bias = model.add_history_bias if getattr(model, "history_bias", None) is not None else None
        apply_policy(scores, rows[valid], batch[valid], policy, history_bias=bias)
        vals, idx = torch.topk(scores, k, dim=1)  # [b, k]
        out_idx[lo:hi] = idx.cpu().numpy()
        out_score[lo:hi] = vals.cpu().numpy()
    source = np.where(lengths.numpy() > 0, "model", "popular")
    frame = pd.DataFrame({
        "user_id": np.repeat(np.asarray(list(user_ids), dtype=object), k),
        "rank": np.tile(np.arange(1, k + 1, dtype=np.int64), len(user_ids)),
        "item_id": item_ids[out_idx.reshape(-1)] if len(user_ids) else item_ids[:0],
        "score": out_score.reshape(-1),
        "source": np.repeat(source, k),
    })
    # every history item excluded (tiny catalogues): those slots are not recommendations
    return frame[np.isfinite(frame["score"].to_numpy())].reset_index(drop=True)


class GRU4RecPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: loads the checkpoint artifact on ``model_config['device']`` (default CPU)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from recsys.model.checkpoint import build_model, load_checkpoint

        self.device = torch.device((context.model_config or {}).get("device", "cpu"))
        ckpt = load_checkpoint(Path(context.artifacts[CHECKPOINT_ARTIFACT]), map_location=self.device)
        self.model = build_model(ckpt, self.device)
        self.vocab = ckpt.vocab
        self.max_history = ckpt.config.score.max_history
        self.policy = ckpt.policy  # the rules it was trained and gated with
        self.top_k_default = ckpt.config.score.top_k

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        params = params or {}
        return recommend(
            self.model, self.vocab, model_input["user_id"].tolist(), model_input["history"].tolist(),
            top_k=int(params.get("top_k", self.top_k_default)), policy=self.policy,
            max_history=self.max_history, device=self.device,
        )


def example_input(vocab: Vocab, n_users: int = 2) -> pd.DataFrame:
    """A small input frame for the model's docs: made-up user ids, popular catalogue items as histories.

    Real users' histories are personal data and do not belong in a model artifact.
    """
    ids = vocab.item_ids.to_list()  # index order: most watched first
    return pd.DataFrame({
        "user_id": [f"example-user-{i + 1}" for i in range(n_users)],
        "history": [ids[i : i + 3] for i in range(n_users)],
    })


def model_signature(vocab: Vocab, top_k: int = DEFAULT_TOP_K) -> mlflow.models.ModelSignature:
    """user_id (any id type) + history (array of item ids) -> user_id, rank, item_id, score, source.

    Param ``top_k`` defaults to the checkpoint's ``score.top_k``. What may be recommended is the
    checkpoint's stored policy, not a request parameter: serving ranks as the gate measured.
    """
    from mlflow.types.schema import AnyType, Array, ColSpec, ParamSchema, ParamSpec, Schema

    item_type = "string" if vocab.item_ids.dtype == pl.String else "long"
    inputs = Schema([ColSpec(AnyType(), "user_id"), ColSpec(Array(item_type), "history")])
    outputs = Schema([
        ColSpec(AnyType(), "user_id"), ColSpec("long", "rank"), ColSpec(item_type, "item_id"),
        ColSpec("float", "score"), ColSpec("string", "source"),
    ])
    params = ParamSchema([ParamSpec("top_k", "long", int(top_k))])
    return mlflow.models.ModelSignature(inputs=inputs, outputs=outputs, params=params)


def log_pyfunc_model(
    checkpoint: Path,
    *,
    registered_model_name: str | None = None,
    name: str = "model",
) -> mlflow.models.model.ModelInfo:
    """Log the checkpoint as a pyfunc model in the active run (and register it when a name is given)."""
    import shutil
    import tempfile

    from recsys.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)  # a checkpoint that does not load is not logged
    example = example_input(ckpt.vocab)
    with tempfile.TemporaryDirectory(prefix="recsys-model-") as tmp:
        staged = Path(tmp) / CHECKPOINT_FILE  # the artifact keeps this name: artifacts/checkpoint.pt
        shutil.copyfile(checkpoint, staged)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(ENTRY_FILE),
            artifacts={CHECKPOINT_ARTIFACT: str(staged)},
            code_paths=[str(PACKAGE_DIR)],
            signature=model_signature(ckpt.vocab, ckpt.config.score.top_k),
            input_example=example,
            pip_requirements=_pip_requirements(),
            registered_model_name=registered_model_name,
        )
