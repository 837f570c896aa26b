"""Training steps on CPU stop page-faulting their buffers in (the first-epoch slowdown of issue 17)."""

import platform
import resource

import numpy as np
import pytest
import torch

from recsys.config import ModelConfig, TrainConfig
from recsys.model.gru4rec import GRU4Rec
from recsys.model.step import SessionParallelTrainer


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc tuning")
@pytest.mark.parametrize("fast", [True, False])
def test_training_steps_do_not_page_fault(fast):
    """Measured without the fix: ~900 (fast) and ~1,400 (plain) minor faults per step at this size."""
    n = 3000
    model = GRU4Rec(n, ModelConfig(hidden_size=100))
    trainer = SessionParallelTrainer(
        model, TrainConfig(batch_size=32, n_sample=2048, fast_step=fast), np.arange(1, n + 1),
        torch.device("cpu"),
    )
    g = torch.Generator().manual_seed(0)
    state, keep = model.init_state(32), torch.ones(32)
    for t in range(60):
        if t == 20:  # after the heap has grown to its working size
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        items = torch.randint(0, n, (32,), generator=g)
        _, state = trainer.step(items, torch.randint(0, n, (32,), generator=g), keep, None, state)
    faults_per_step = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 40
    assert faults_per_step < 50
