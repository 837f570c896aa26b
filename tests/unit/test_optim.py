import torch
from torch import nn

from recsys.model.optim import SparseRowOptimizer


def test_only_touched_rows_change_and_duplicates_are_summed():
    table = nn.Parameter(torch.randn(10, 3))
    before = table.detach().clone()
    opt = SparseRowOptimizer([], {"t": table}, lr=0.1)
    g = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5], [0.5, -0.5, 1.0]])
    opt.step({"t": (torch.tensor([1, 3, 3]), g)})
    untouched = [i for i in range(10) if i not in (1, 3)]
    assert torch.equal(table.detach()[untouched], before[untouched])
    assert torch.count_nonzero(opt.table_acc["t"][untouched]) == 0
    g3 = g[1] + g[2]  # row 3 gets the sum of its two gradient rows, once
    want3 = before[3] - 0.1 * g3 / (g3 * g3 + 1e-6).sqrt()
    assert torch.allclose(table.detach()[3], want3, atol=1e-6)
    assert torch.allclose(opt.table_acc["t"][3], g3 * g3)


def test_sparse_matches_dense_adagrad_momentum_on_touched_rows():
    torch.manual_seed(0)
    table = nn.Parameter(torch.randn(6, 2))
    dense = nn.Parameter(table.detach().clone())
    opt_sparse = SparseRowOptimizer([], {"t": table}, lr=0.05, momentum=0.5)
    opt_dense = SparseRowOptimizer([dense], {}, lr=0.05, momentum=0.5)
    for _ in range(3):
        g = torch.randn(2, 2)
        opt_sparse.step({"t": (torch.tensor([0, 4]), g)})
        full = torch.zeros(6, 2)
        full[[0, 4]] = g
        dense.grad = full
        opt_dense.step({})
    assert torch.allclose(table.detach()[[0, 4]], dense.detach()[[0, 4]], atol=1e-6)


def test_grad_clip_bounds_the_step_and_state_round_trips():
    w = nn.Parameter(torch.zeros(3))
    opt = SparseRowOptimizer([w], {}, kind="adam", lr=0.1, grad_clip=1.0)
    w.grad = torch.tensor([100.0, 0.0, 0.0])
    opt.step({})
    assert w.grad is None and w.detach()[0] < 0
    other = SparseRowOptimizer([nn.Parameter(torch.zeros(3))], {}, kind="adam")
    other.load_state_dict(opt.state_dict())
    assert other.step_count == 1 and torch.equal(other.dense_acc[0], opt.dense_acc[0])
