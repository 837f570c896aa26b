"""The hand-written training step (train.fast_step) equals autograd over the plain network, step by step."""

from __future__ import annotations

import itertools

import numpy as np
import polars as pl
import pytest
import torch

from recsys.config import ModelConfig, TrainConfig
from recsys.model.batching import plan_epoch
from recsys.model.gru4rec import GRU4Rec
from recsys.model.step import SessionParallelTrainer, should_compile

N_ITEMS = 30
# Besides the defaults: two layers, both dropouts, the history bias, logQ, momentum, masked history
# negatives; and gradient clipping with Adam and BPR-max without ELU.
EXTRAS = {
    "defaults": ({}, {}),
    "everything": (
        {"n_layers": 2, "dropout_embed": 0.2, "dropout_hidden": 0.3, "history_bias": True},
        {"logq": 0.5, "momentum": 0.5, "mask_seen_negatives": True},
    ),
    "clip-adam-noelu": ({}, {"grad_clip": 0.1, "optimizer": "adam", "elu_param": 0.0}),
}
CASES = [  # every cell x embedding x loss with everything on; the defaults and Adam on fewer
    (cell, emb, loss, "everything")
    for cell, emb, loss in itertools.product(
        ("gru", "lstm", "rnn"), ("shared", "separate", "none"), ("cross_entropy", "bpr_max")
    )
]
CASES += [
    ("gru", emb, loss, "defaults")
    for emb in ("shared", "separate", "none")
    for loss in ("cross_entropy", "bpr_max")
]
CASES += [
    ("gru", "shared", "bpr_max", "clip-adam-noelu"),
    ("lstm", "separate", "cross_entropy", "clip-adam-noelu"),
    ("rnn", "none", "cross_entropy", "clip-adam-noelu"),
]


def _train_steps(
    fast: bool, mcfg: ModelConfig, tcfg: TrainConfig, steps: int = 4, static: bool = False, trainer=None
):
    """A few steps on random batches with slot resets and idle slots; (losses, final parameters)."""
    torch.manual_seed(0)
    model = GRU4Rec(N_ITEMS, mcfg) if trainer is None else trainer.model
    trainer = trainer or SessionParallelTrainer(
        model,
        tcfg.model_copy(update={"fast_step": fast}),
        np.arange(1, N_ITEMS + 1),
        torch.device("cpu"),
        static=static,
    )
    B = tcfg.batch_size
    g = torch.Generator().manual_seed(1)
    state = model.init_state(B)
    if trainer.track_seen:
        trainer.seen = torch.zeros(B, N_ITEMS, dtype=torch.bool)
    torch.manual_seed(7)  # dropout masks: both paths draw the same ones in the same order
    losses = []
    for t in range(steps):
        inputs = torch.randint(0, N_ITEMS, (B,), generator=g)  # [B] repeats: duplicate rows to sum
        targets = torch.randint(0, N_ITEMS, (B,), generator=g)  # [B]
        keep = (torch.rand(B, generator=g) > 0.3).float()  # [B]
        active = None if t % 2 == 0 else torch.rand(B, generator=g) > 0.2  # [B]
        loss, state = trainer.step(inputs, targets, keep, active, state)
        losses.append(float(loss))
    return losses, {k: v.clone() for k, v in model.state_dict().items()}, trainer


@pytest.mark.parametrize(("cell", "embedding", "loss", "extra"), CASES)
def test_fast_step_equals_autograd_step(cell, embedding, loss, extra):
    m_extra, t_extra = EXTRAS[extra]
    mcfg = ModelConfig(cell=cell, embedding=embedding, hidden_size=8, embedding_dim=6, **m_extra)
    tcfg = TrainConfig(loss=loss, batch_size=6, n_sample=10, **t_extra)
    plain_losses, plain, plain_trainer = _train_steps(False, mcfg, tcfg)
    fast_losses, fast, fast_trainer = _train_steps(True, mcfg, tcfg)
    np.testing.assert_allclose(fast_losses, plain_losses, rtol=1e-5, atol=1e-6)
    # Adam divides by sqrt(v) + 1e-8, which turns a float-rounding difference in a ~1e-11 gradient
    # entry into a visible step; its moments (linear in the gradients) are compared tightly below.
    atol = 1e-3 if tcfg.optimizer == "adam" else 1e-5
    for key, value in plain.items():
        torch.testing.assert_close(fast[key], value, rtol=1e-4, atol=atol, msg=key)
    p_opt, f_opt = plain_trainer.optimizer, fast_trainer.optimizer
    for a, b in zip(p_opt.dense_acc + p_opt.dense_vel, f_opt.dense_acc + f_opt.dense_vel, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    for name, acc in plain_trainer.optimizer.table_acc.items():
        torch.testing.assert_close(fast_trainer.optimizer.table_acc[name], acc, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_static_buffers_equal_the_dynamic_step(cell):
    """The CUDA-graph path's fixed buffers, run eagerly on CPU, give the dynamic fast step's results."""
    mcfg = ModelConfig(cell=cell, hidden_size=8, history_bias=True)
    tcfg = TrainConfig(batch_size=6, n_sample=10, mask_seen_negatives=True, momentum=0.3)
    dyn_losses, dyn, _ = _train_steps(True, mcfg, tcfg, steps=6)
    static_losses, static, trainer = _train_steps(True, mcfg, tcfg, steps=6, static=True)
    assert type(trainer._fused).__name__ == "StaticStep"
    np.testing.assert_allclose(static_losses, dyn_losses, rtol=1e-6)
    for key, value in dyn.items():
        torch.testing.assert_close(static[key], value, rtol=1e-6, atol=1e-7, msg=key)


def test_static_epoch_equals_plain_epoch(tmp_path):
    """A whole epoch (slot resets, idle slots at the end) on fixed buffers vs the plain autograd path."""
    from recsys.data.sequences import SequenceSet

    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 9, size=25)
    items = rng.integers(0, N_ITEMS, size=int(lengths.sum()))
    seqs = SequenceSet(
        items=items,
        offsets=np.concatenate([[0], np.cumsum(lengths)]),
        n_context=np.zeros(len(lengths), dtype=np.int64),
        user_ids=pl.Series(range(len(lengths))),
    )
    plan = plan_epoch(seqs, 4, np.random.default_rng(1)).to_torch("cpu")
    assert not all(plan.all_active)  # the epoch ends with idle slots
    results = {}
    for name, fast, static in (("plain", False, False), ("static", True, True)):
        torch.manual_seed(0)
        model = GRU4Rec(N_ITEMS, ModelConfig(hidden_size=8))
        cfg = TrainConfig(batch_size=4, n_sample=5, fast_step=fast)
        trainer = SessionParallelTrainer(model, cfg, np.ones(N_ITEMS), torch.device("cpu"), static=static)
        losses = [trainer.run_epoch(plan, epoch) for epoch in (1, 2)]
        results[name] = (losses, model.state_dict())
    np.testing.assert_allclose(results["static"][0], results["plain"][0], rtol=1e-5)
    for key, value in results["plain"][1].items():
        torch.testing.assert_close(results["static"][1][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_cuda_graphs_need_the_fast_step():
    with pytest.raises(ValueError, match="fast_step"):
        SessionParallelTrainer(
            GRU4Rec(5, ModelConfig(hidden_size=4)),
            TrainConfig(fast_step=False, cuda_graphs=True),
            np.ones(5),
            torch.device("cpu"),
        )


def test_prepare_leaves_training_unchanged():
    """prepare() runs a throw-away step (to compile it) and puts back everything that step changed."""
    mcfg = ModelConfig(hidden_size=8, history_bias=True, dropout_hidden=0.2)
    tcfg = TrainConfig(batch_size=6, n_sample=10, mask_seen_negatives=True, momentum=0.3)
    plain_run = _train_steps(True, mcfg, tcfg, steps=3)
    torch.manual_seed(0)
    model = GRU4Rec(N_ITEMS, mcfg)
    trainer = SessionParallelTrainer(model, tcfg, np.arange(1, N_ITEMS + 1), torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert trainer.prepare(6, force=True) > 0
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key
    prepared_run = _train_steps(True, mcfg, tcfg, steps=3, trainer=trainer)
    assert prepared_run[0] == plain_run[0]
    for key, value in plain_run[1].items():
        assert torch.equal(prepared_run[1][key], value), key


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["cross_entropy", "bpr_max"])
def test_compiled_fast_step_equals_eager(loss):
    """train.compile: inductor's fused step gives the eager step's numbers (compiles: tens of seconds)."""
    mcfg = ModelConfig(cell="gru", hidden_size=8, history_bias=True, n_layers=2)
    tcfg = TrainConfig(loss=loss, batch_size=6, n_sample=10, mask_seen_negatives=True, logq=0.3, momentum=0.2)
    eager_losses, eager, _ = _train_steps(True, mcfg, tcfg)
    compiled_losses, compiled, _ = _train_steps(True, mcfg, tcfg.model_copy(update={"compile": True}))
    np.testing.assert_allclose(compiled_losses, eager_losses, rtol=1e-4, atol=1e-5)
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-3, atol=1e-4, msg=key)


@pytest.mark.parametrize(("train", "model"), [
    ({"logq_targets": "count"}, {}),
    ({"mask_duplicate_targets": False}, {}),
    ({}, {"dropout_state": True}),
])
def test_published_options_the_fast_step_lacks_train_with_the_plain_step(train, model):
    """The published-GRU4Rec settings are implemented by the plain step only: asking for one of them must
    never be silently ignored by the fast step."""
    net = GRU4Rec(20, ModelConfig(hidden_size=8, **model))
    trainer = SessionParallelTrainer(net, TrainConfig(batch_size=4, n_sample=4, fast_step=True, **train),
                                     np.arange(1, 21), torch.device("cpu"))
    assert trainer.cfg.fast_step is False
    with pytest.raises(ValueError, match="cuda_graphs"):
        SessionParallelTrainer(net, TrainConfig(batch_size=4, n_sample=4, fast_step=True, cuda_graphs=True,
                                                **train), np.arange(1, 21), torch.device("cpu"))


@pytest.mark.parametrize(("setting", "device", "epochs", "steps", "fast", "want"), [
    ("auto", "cpu", 10, 2_999, True, False),  # short: the compile would not pay for itself
    ("auto", "cpu", 10, 3_000, True, True),  # 30,000 steps
    ("auto", "cuda", 10, 10_000, True, False),  # CUDA: graphs, not inductor
    ("auto", "cpu", 10, 10_000, False, False),  # only the fast step is compiled
    (True, "cpu", 1, 1, True, True),
    (False, "cpu", 100, 100_000, True, False),
])
def test_compile_auto_is_on_only_for_long_cpu_runs(setting, device, epochs, steps, fast, want):
    cfg = TrainConfig(compile=setting, epochs=epochs, fast_step=fast)
    assert should_compile(cfg, torch.device(device), steps) is want


def test_prepare_resolves_compile_auto_once():
    """A short run with the default train.compile=auto stays eager: prepare() compiles nothing."""
    model = GRU4Rec(N_ITEMS, ModelConfig(hidden_size=8))
    trainer = SessionParallelTrainer(model, TrainConfig(batch_size=6, n_sample=10, epochs=2),
                                     np.arange(1, N_ITEMS + 1), torch.device("cpu"))
    assert trainer.cfg.compile == "auto"
    assert trainer.prepare(6, steps_per_epoch=50) == 0.0
    assert trainer.cfg.compile is False
    losses, _, _ = _train_steps(True, model.config, trainer.cfg, trainer=trainer)
    assert not trainer._fused.compiled and np.isfinite(losses).all()
