import pytest
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


@pytest.mark.slow
def test_compiled_update_touches_only_the_rows():
    """Compiled by inductor (train.compile), the row update must not copy whole tables per step: it did
    while the scratch buffer was zeroed after the sum, which made each step O(n_items)."""
    from torch._inductor.utils import run_and_get_code

    n_items, dim = 9_973, 7  # a table size no other buffer here has
    table = nn.Parameter(torch.randn(n_items, dim))
    opt = SparseRowOptimizer([], {"t": table}, lr=0.1)
    idx = torch.tensor([5, 17, 5, 9_000])  # a duplicate: summed once
    g = torch.randn(4, dim)
    reference = SparseRowOptimizer([], {"t": nn.Parameter(table.detach().clone())}, lr=0.1)
    reference.update([], [], {"t": (idx, g)}, 1)

    def update(idx, g):
        opt.update([], [], {"t": (idx, g)}, 1)

    _, codes = run_and_get_code(torch.compile(update, dynamic=False), idx, g)
    code = "\n".join(codes)
    assert f"{n_items * dim}L" not in code  # no C++ loop over a whole table
    assert f"empty_strided_cpu(({n_items}, {dim})" not in code  # no table-sized temporary
    torch.testing.assert_close(table.detach(), reference.tables["t"].detach())
    torch.testing.assert_close(opt.table_acc["t"], reference.table_acc["t"])
