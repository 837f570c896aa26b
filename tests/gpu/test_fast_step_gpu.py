"""The fast step and its CUDA graph on a GPU: skipped without CUDA (``pytest -m gpu tests/gpu``)."""

import numpy as np
import pytest
import torch

from recsys.config import ModelConfig, TrainConfig
from recsys.model.gru4rec import GRU4Rec
from recsys.model.step import SessionParallelTrainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
N_ITEMS = 50


def _run(fast: bool, graphs: bool, mcfg: ModelConfig, tcfg: TrainConfig, steps: int = 8):
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = GRU4Rec(N_ITEMS, mcfg).to(dev)
    cfg = tcfg.model_copy(update={"fast_step": fast, "cuda_graphs": graphs, "amp": False})
    trainer = SessionParallelTrainer(model, cfg, np.arange(1, N_ITEMS + 1), dev)
    B = cfg.batch_size
    g = torch.Generator().manual_seed(1)
    state = model.init_state(B, dev)
    if trainer.track_seen:
        trainer.seen = torch.zeros(B, N_ITEMS, dtype=torch.bool, device=dev)
    losses = []
    for t in range(steps):
        inputs = torch.randint(0, N_ITEMS, (B,), generator=g).to(dev)  # [B]
        targets = torch.randint(0, N_ITEMS, (B,), generator=g).to(dev)  # [B]
        keep = (torch.rand(B, generator=g) > 0.3).float().to(dev)  # [B]
        active = None if t % 3 else (torch.rand(B, generator=g) > 0.2).to(dev)  # [B]
        loss, state = trainer.step(inputs, targets, keep, active, state)
        losses.append(float(loss))
    return losses, {k: v.float().cpu() for k, v in model.state_dict().items()}, trainer


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("loss", ["cross_entropy", "bpr_max"])
def test_cuda_graph_replays_equal_the_eager_fast_and_plain_steps(cell, loss):
    """Warm-up, capture and replays (steps 3..8) give the eager results (no dropout: same numbers)."""
    mcfg = ModelConfig(cell=cell, hidden_size=16, history_bias=True)
    tcfg = TrainConfig(loss=loss, batch_size=8, n_sample=20, mask_seen_negatives=True, momentum=0.3)
    plain = _run(False, False, mcfg, tcfg)
    eager = _run(True, False, mcfg, tcfg)
    graphed = _run(True, True, mcfg, tcfg)
    assert graphed[2]._fused.graph is not None  # really replayed a captured graph
    for other in (eager, graphed):
        np.testing.assert_allclose(other[0], plain[0], rtol=1e-4, atol=1e-5)
        for key, value in plain[1].items():
            torch.testing.assert_close(other[1][key], value, rtol=1e-3, atol=1e-4, msg=key)


def test_cuda_graph_training_with_dropout_and_bf16_learns(tmp_path):
    """Dropout (RNG inside the graph) and bf16 matmuls: the loss goes down over an epoch."""
    mcfg = ModelConfig(hidden_size=32, dropout_hidden=0.2, dropout_embed=0.1)
    tcfg = TrainConfig(batch_size=16, n_sample=32, cuda_graphs=True, amp=True, learning_rate=0.1)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = GRU4Rec(N_ITEMS, mcfg).to(dev)
    trainer = SessionParallelTrainer(model, tcfg, np.ones(N_ITEMS), dev)
    state = model.init_state(16, dev)
    nxt = torch.roll(torch.arange(N_ITEMS), -1).to(dev)  # item i is followed by i + 1
    items = torch.randint(0, N_ITEMS, (16,), device=dev)
    keep = torch.ones(16, device=dev)
    losses = []
    for _ in range(300):
        loss, state = trainer.step(items, nxt[items], keep, None, state)
        losses.append(float(loss))
        items = nxt[items]
    assert np.isfinite(losses).all() and np.mean(losses[-30:]) < 0.5 * np.mean(losses[:30])
