"""Row-sparse Adagrad with momentum (GRU4Rec's optimiser) and a lazy Adam, without autograd over tables.

Item tables (``item_out``, ``item_bias``, ``item_in``) receive gradients only for the rows a step
touched; the training step gathers those rows as detached leaves and hands ``(indices, row gradients)``
here, so no dense ``[n_items, H]`` gradient is ever materialised or zeroed and untouched rows keep
their accumulators and velocities unchanged. Duplicate indices are summed through a persistent scratch
buffer (zero the touched rows, ``index_add_``, gather), which needs no ``unique`` and therefore no
host-device sync on CUDA.
Dense parameters (the recurrent weights) use the same rule with ``torch._foreach`` kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SparseRowOptimizer:
    """``kind``: ``adagrad_momentum`` (Adagrad accumulators + momentum on the scaled step) or ``adam``."""

    def __init__(
        self,
        dense: list[nn.Parameter],
        tables: dict[str, nn.Parameter],
        *,
        kind: str = "adagrad_momentum",
        lr: float = 0.05,
        momentum: float = 0.0,
        eps: float = 1e-6,
        betas: tuple[float, float] = (0.9, 0.999),
        grad_clip: float | None = None,
    ) -> None:
        if kind not in ("adagrad_momentum", "adam"):
            raise ValueError(f"unknown optimizer {kind!r}")
        self.kind = kind
        self.lr = lr
        self.momentum = momentum
        self.eps = eps if kind == "adagrad_momentum" else 1e-8
        self.betas = betas
        self.grad_clip = grad_clip
        self.dense = list(dense)
        self.tables = dict(tables)
        self.step_count = 0
        # Slot 1: Adagrad accumulator / Adam second moment; slot 2: velocity / Adam first moment.
        self.dense_acc = [torch.zeros_like(p) for p in self.dense]
        self.dense_vel = [torch.zeros_like(p) for p in self.dense]
        self.table_acc = {k: torch.zeros_like(p) for k, p in self.tables.items()}
        self.table_vel = {k: torch.zeros_like(p) for k, p in self.tables.items()}
        self._scratch = {k: torch.zeros_like(p) for k, p in self.tables.items()}  # summing buffer
        self._count = {k: torch.zeros(p.shape[0], device=p.device) for k, p in self.tables.items()}

    # --- state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "step_count": self.step_count,
            "dense_acc": [t.clone() for t in self.dense_acc],
            "dense_vel": [t.clone() for t in self.dense_vel],
            "table_acc": {k: t.clone() for k, t in self.table_acc.items()},
            "table_vel": {k: t.clone() for k, t in self.table_vel.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state["kind"] != self.kind:
            raise ValueError(f"optimizer state is for {state['kind']!r}, not {self.kind!r}")
        self.step_count = int(state["step_count"])
        for dst, src in zip(
            self.dense_acc + self.dense_vel, state["dense_acc"] + state["dense_vel"], strict=True
        ):
            dst.copy_(src)
        for k in self.tables:
            self.table_acc[k].copy_(state["table_acc"][k])
            self.table_vel[k].copy_(state["table_vel"][k])

    # --- update ---------------------------------------------------------------------------------------

    def _sum_rows(self, name: str, idx: Tensor, grad: Tensor) -> Tensor:
        """Gradient rows summed over duplicate indices, one row per occurrence: [K, ...].

        The touched rows of the scratch buffer are zeroed *before* the sum (rows left over from earlier
        steps are never read): compiled by inductor, each of these writes then happens in place, whereas
        zeroing after the read made it copy the whole [n_items, ...] buffer twice per step.
        """
        buf = self._scratch[name]
        buf.index_fill_(0, idx, 0.0)  # [n, ...]
        buf.index_add_(0, idx, grad.to(buf.dtype))  # [n, ...]
        return buf.index_select(0, idx)  # [K, ...] duplicates read the same summed row

    def _clip_scale(
        self, dense_grads: list[Tensor], sparse: dict[str, tuple[Tensor, Tensor]]
    ) -> Tensor | None:
        """Global-norm clip factor over dense grads and the (duplicate-summed) touched rows."""
        if self.grad_clip is None:
            return None
        sq = torch.stack([g.square().sum() for g in dense_grads]).sum() if dense_grads else None  # []
        for name, (idx, rows) in sparse.items():
            cnt = self._count[name]
            cnt.index_fill_(0, idx, 0.0)  # [n] zeroed before the count (see _sum_rows)
            cnt.index_add_(0, idx, torch.ones_like(idx, dtype=cnt.dtype))  # [n]
            per_row = rows.reshape(rows.shape[0], -1).square().sum(1) / cnt.index_select(
                0, idx
            )  # [K] once each
            sq = per_row.sum() if sq is None else sq + per_row.sum()
        if sq is None:
            return None
        return (self.grad_clip / (sq.sqrt() + 1e-6)).clamp(max=1.0)  # []

    @torch.no_grad()
    def step(self, sparse_grads: dict[str, tuple[Tensor, Tensor]]) -> None:
        """One update: dense params from ``.grad``; tables from ``{name: (indices [K], grads [K, ...])}``."""
        self.step_count += 1
        params = [p for p in self.dense if p.grad is not None]
        self.update(params, [p.grad for p in params], sparse_grads, self.step_count)
        for p in params:
            p.grad = None

    @torch.no_grad()
    def update(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        sparse_grads: dict[str, tuple[Tensor, Tensor]],
        step_count: int | Tensor,
    ) -> None:
        """The update itself, from explicit gradients: dense ``params`` (a subset of the optimiser's, in its
        order) with ``grads``; tables from ``{name: (indices [K], grads [K, ...])}``. Only tensor
        operations and no Python state change, so the fast step can compile it or capture it in a CUDA
        graph; ``step_count`` (1-based, Adam's bias correction) may be a tensor for that reason."""
        slot = {id(p): i for i, p in enumerate(self.dense)}
        acc = [self.dense_acc[slot[id(p)]] for p in params]
        vel = [self.dense_vel[slot[id(p)]] for p in params]
        summed = {k: (idx, self._sum_rows(k, idx, g)) for k, (idx, g) in sparse_grads.items()}
        scale = self._clip_scale(grads, summed)
        if scale is not None:
            if grads:
                grads = torch._foreach_mul(grads, scale)
            summed = {k: (idx, rows * scale) for k, (idx, rows) in summed.items()}
        if params:
            self._dense_update(params, grads, acc, vel, step_count)
        for name, (idx, rows) in summed.items():
            self._row_update(name, idx, rows, step_count)

    def _dense_update(
        self, params: list[Tensor], grads: list[Tensor], acc: list[Tensor], vel: list[Tensor], step_count
    ) -> None:
        if self.kind == "adagrad_momentum":
            torch._foreach_addcmul_(acc, grads, grads)  # G += g^2
            denom = torch._foreach_add(acc, self.eps)
            torch._foreach_sqrt_(denom)
            upd = torch._foreach_div(grads, denom)  # g / sqrt(G + eps)
            if self.momentum:
                torch._foreach_mul_(vel, self.momentum)
                torch._foreach_add_(vel, upd, alpha=self.lr)  # v = mom*v + lr*step
                torch._foreach_sub_(params, vel)
            else:
                torch._foreach_add_(params, upd, alpha=-self.lr)
            return
        b1, b2 = self.betas
        torch._foreach_lerp_(vel, grads, 1 - b1)  # m
        torch._foreach_mul_(acc, b2)
        torch._foreach_addcmul_(acc, grads, grads, value=1 - b2)  # v
        c1, c2 = 1 - b1**step_count, 1 - b2**step_count
        denom = torch._foreach_div(acc, c2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, self.eps)
        if isinstance(c1, Tensor):
            torch._foreach_addcdiv_(params, torch._foreach_mul(vel, -self.lr / c1), denom)
        else:
            torch._foreach_addcdiv_(params, vel, denom, value=-self.lr / c1)

    def _row_update(self, name: str, idx: Tensor, g: Tensor, step_count) -> None:
        """Update rows ``idx`` of table ``name`` (duplicates carry identical values, so writes agree)."""
        p, acc, vel = self.tables[name], self.table_acc[name], self.table_vel[name]
        if self.kind == "adagrad_momentum":
            a = acc.index_select(0, idx).addcmul_(g, g)  # [K, ...]
            acc.index_copy_(0, idx, a)
            upd = g / (a + self.eps).sqrt_()  # [K, ...]
            if self.momentum:
                upd = vel.index_select(0, idx).mul_(self.momentum).add_(upd, alpha=self.lr)  # [K, ...]
                vel.index_copy_(0, idx, upd)
                p.index_copy_(0, idx, p.index_select(0, idx).sub_(upd))
            else:
                p.index_copy_(0, idx, p.index_select(0, idx).sub_(upd, alpha=self.lr))
            return
        b1, b2 = self.betas
        m = vel.index_select(0, idx).lerp_(g, 1 - b1)  # [K, ...] lazy Adam: only touched rows' moments move
        v = acc.index_select(0, idx).mul_(b2).addcmul_(g, g, value=1 - b2)  # [K, ...]
        vel.index_copy_(0, idx, m)
        acc.index_copy_(0, idx, v)
        c1, c2 = 1 - b1**step_count, 1 - b2**step_count
        p.index_copy_(0, idx, p.index_select(0, idx) - (self.lr / c1) * m / ((v / c2).sqrt() + self.eps))
