"""GRU4Rec on CUDA: skipped without a GPU (run with ``pytest -m gpu tests/gpu``)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))
from model_data import cyclic_sequences, write_split_dir  # noqa: E402

from recsys.config import load_config  # noqa: E402
from recsys.model.checkpoint import build_model, load_checkpoint  # noqa: E402
from recsys.training.train import train_model  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
TINY = ["model.hidden_size=16", "train.batch_size=8", "train.n_sample=16", "sessions.mode=user"]


@pytest.mark.parametrize("amp", [True, False])
def test_cuda_training_beats_popularity_and_loads_on_cpu(tmp_path, amp):
    split_dir = write_split_dir(tmp_path / "split", cyclic_sequences())
    config = load_config(
        overrides=[
            f"paths.data_root={tmp_path}",
            *TINY,
            "train.epochs=3",
            "train.device=cuda",
            f"train.amp={amp}",
        ]
    )
    res = train_model(config, split_dir)
    assert res.device.startswith("cuda")
    assert res.test_metrics["mrr@20"] > 2 * res.baseline_metrics["most-popular"]["mrr@20"]
    model = build_model(load_checkpoint(res.best_checkpoint, map_location="cpu"), "cpu")
    assert next(model.parameters()).device.type == "cpu"


def test_cuda_and_cpu_steps_agree_in_fp32(tmp_path):
    split_dir = write_split_dir(tmp_path / "split", cyclic_sequences())
    states = {}
    for device in ("cpu", "cuda"):
        config = load_config(
            overrides=[
                f"paths.data_root={tmp_path / device}",
                *TINY,
                "train.epochs=1",
                f"train.device={device}",
                "train.amp=false",
                "train.n_sample=0",
                "model.history_bias=true",  # the history bitmap and the learned offset on the device too
                "policy.exclude=none",
            ]
        )
        res = train_model(config, split_dir, evaluate_test=False)
        states[device] = load_checkpoint(res.best_checkpoint).model_state
    for key, value in states["cpu"].items():
        assert torch.allclose(value, states["cuda"][key], atol=1e-3), key
