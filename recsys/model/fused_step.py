"""The training step written out by hand: forward, backward and update with few, static-shape operations.

The plain step (:class:`recsys.model.step.SessionParallelTrainer` with ``train.fast_step: false``) builds
an autograd graph of ~150 small operations per mini-batch; at GRU4Rec sizes their dispatch cost, not the
arithmetic, bounds the speed. Here the same mathematics is written as plain tensor code under
``no_grad``: the recurrent cells and the two sampled losses have hand-derived gradients (one recurrent
step, because the carried state is detached), the sampled scores and the loss gradient are one fused
expression, and the dense and row-sparse updates go to the same :class:`SparseRowOptimizer`. Every shape
depends only on the batch size and ``n_sample`` (idle slots are masked, never sliced away), so the step
can be captured once as a CUDA graph (:mod:`recsys.model.cuda_graph`). A unit test compares a few steps
of this path with the plain one to float tolerance for every cell, loss and embedding mode.

Dropout masks are drawn like ``F.dropout`` on CPU (``bernoulli_(1 - p)`` then ``/ (1 - p)``), in the
plain step's order, so on CPU the two paths also agree with dropout on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from recsys.model.gru4rec import GRU4Rec, RecurrentLayer

aten = torch.ops.aten


@dataclass
class _LayerCache:
    """What one layer's backward needs from its forward."""

    x: Tensor  # [B, I] layer input after dropout (unused for a one-hot first layer)
    h: Tensor  # [B, H] previous hidden state
    acts: tuple[Tensor, ...]  # cell activations (see _cell_forward)
    drop: Tensor | None  # [B, H] hidden dropout mask (scaled) or None


def dropout_mask(x: Tensor, p: float) -> Tensor:
    """The mask ``F.dropout`` multiplies by on CPU, drawn the same way: [*x.shape] of 0 or 1/(1-p)."""
    return torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)


def _cell_forward(layer: RecurrentLayer, gx: Tensor, state: Tensor) -> tuple[Tensor, Tensor, tuple]:
    """One position like ``RecurrentLayer.cell_step``, keeping the activations the backward needs.

    gx [B, g*H]; state [B, S] -> (h_new [B, H], new state [B, S], activations).
    """
    H = layer.hidden_size
    if layer.cell == "gru":
        h = state  # [B, H]
        gh = h @ layer.w_hh.t()  # [B, 3H]
        rz = torch.sigmoid(gx[:, : 2 * H] + gh[:, : 2 * H])  # [B, 2H]
        n = torch.tanh(gx[:, 2 * H :] + rz[:, :H] * gh[:, 2 * H :])  # [B, H]
        h_minus_n = h - n  # [B, H]
        h_new = n + rz[:, H:] * h_minus_n  # [B, H]
        return h_new, h_new, (rz, n, h_minus_n, gh[:, 2 * H :])
    if layer.cell == "lstm":
        c = state[:, H:]  # [B, H]
        gates = gx + state[:, :H] @ layer.w_hh.t()  # [B, 4H]
        ifo = torch.sigmoid(gates[:, : 3 * H])  # [B, 3H]
        g = torch.tanh(gates[:, 3 * H :])  # [B, H]
        c_new = ifo[:, H : 2 * H] * c + ifo[:, :H] * g  # [B, H]
        tc = torch.tanh(c_new)  # [B, H]
        h_new = ifo[:, 2 * H :] * tc  # [B, H]
        return h_new, torch.cat([h_new, c_new], dim=1), (ifo, g, c, tc)
    h_new = torch.tanh(gx + state @ layer.w_hh.t())  # [B, H]
    return h_new, h_new, (h_new,)


def _cell_backward(layer: RecurrentLayer, dh: Tensor, cache: _LayerCache) -> tuple[Tensor, Tensor]:
    """Gradient of the gate pre-activations: (d gx [B, g*H], d gh [B, g*H]) from d h_new [B, H].

    Only h_new carries gradient: the new state is detached for the next step (one-step truncation).
    """
    H = layer.hidden_size
    if layer.cell == "gru":
        rz, n, h_minus_n, ghn = cache.acts
        z = rz[:, H:]  # [B, H]
        dn = aten.tanh_backward(dh - dh * z, n)  # [B, H] through n = tanh(a_n)
        drz = aten.sigmoid_backward(torch.cat([dn * ghn, dh * h_minus_n], dim=1), rz)  # [B, 2H]
        return torch.cat([drz, dn], dim=1), torch.cat([drz, dn * rz[:, :H]], dim=1)  # [B, 3H] each
    if layer.cell == "lstm":
        ifo, g, c, tc = cache.acts
        dc = aten.tanh_backward(dh * ifo[:, 2 * H :], tc)  # [B, H]
        d_ifo = aten.sigmoid_backward(torch.cat([dc * g, dc * c, dh * tc], dim=1), ifo)  # [B, 3H]
        dgates = torch.cat([d_ifo, aten.tanh_backward(dc * ifo[:, :H], g)], dim=1)  # [B, 4H]
        return dgates, dgates
    dpre = aten.tanh_backward(dh, cache.acts[0])  # [B, H]
    return dpre, dpre


def cross_entropy_grad(scores: Tensor, mask: Tensor, weight: Tensor, eye: Tensor) -> tuple[Tensor, Tensor]:
    """Sampled softmax cross-entropy and its score gradient: (loss [], d scores [B, C]).

    ``weight`` [B] is the per-row loss weight already divided by the batch size (0 for idle rows);
    ``eye`` [B, C] is 1 on the diagonal of the first B columns (the positives). Overwrites ``scores``.
    """
    logp = torch.log_softmax(scores.masked_fill_(mask, float("-inf")), dim=1)  # [B, C] (scores reused)
    loss = -(logp[:, : eye.shape[0]].diagonal() * weight).sum()  # []
    return loss, logp.exp_().sub_(eye).mul_(weight.unsqueeze(1))  # [], [B, C] softmax - onehot, in place


def bpr_max_grad(
    scores: Tensor, mask: Tensor, weight: Tensor, eye: Tensor, bpreg: float
) -> tuple[Tensor, Tensor]:
    """BPR-max with score regularisation (see ``losses.bpr_max``) and its score gradient.

    With w the softmax over row i's negatives, s = sigmoid(r_i - r_ij), A = sum w s, R = sum w r^2:
    loss_i = -log(A + 1e-24) + bpreg R; d/dr_ij = w (A - s^2) / A + bpreg w (r^2 + 2r - R) for a negative,
    and -sum_j w s (1 - s) / A for the positive.
    """
    B = eye.shape[0]
    neg_mask = mask | eye.bool()  # [B, C] the positive is not a negative
    w = torch.softmax(scores.masked_fill(neg_mask, float("-inf")), dim=1).masked_fill(neg_mask, 0.0)  # [B, C]
    pos = scores[:, :B].diagonal().unsqueeze(1)  # [B, 1]
    sig = torch.sigmoid(pos - scores)  # [B, C]
    ws = w * sig  # [B, C]
    a_raw = ws.sum(dim=1, keepdim=True)  # [B, 1]
    a = a_raw + 1e-24  # [B, 1]
    sq = scores.square()  # [B, C]
    reg = (w * sq).sum(dim=1, keepdim=True)  # [B, 1]
    loss = ((reg * bpreg - torch.log(a)).squeeze(1) * weight).sum()  # []
    d_neg = (w * a_raw - ws * sig) / a + bpreg * w * (sq + 2 * scores - reg)  # [B, C]
    d_pos = -(ws - ws * sig).sum(dim=1, keepdim=True) / a  # [B, 1]
    return loss, (d_neg + eye * d_pos) * weight.unsqueeze(1)  # [], [B, C]


class FusedStep:
    """The hand-written step for one model and optimiser; ``__call__`` has static shapes throughout.

    ``trainer`` is the owning :class:`SessionParallelTrainer` (config, sampler, optimiser, autocast).
    """

    def __init__(self, trainer, batch_size: int) -> None:
        self.trainer = trainer
        self.model: GRU4Rec = trainer.model
        self.cfg = trainer.cfg
        model, dev = self.model, trainer.device
        B, C = batch_size, batch_size + self.cfg.n_sample
        self.batch_size = B
        eye = torch.zeros(B, C, device=dev)  # [B, C]
        eye[:, :B] = torch.eye(B, device=dev)
        self.eye = eye  # [B, C]
        self.off_diagonal = eye == 0  # [B, C]
        self.all_active = torch.ones(B, dtype=torch.bool, device=dev)  # [B]
        self.true = torch.ones((), dtype=torch.bool, device=dev)  # [] written into the history bitmap
        self.sample_valid = torch.ones(self.cfg.n_sample, dtype=torch.bool, device=dev)  # [n_sample]
        self.dense = trainer.optimizer.dense  # parameters in the optimiser's order
        self.shared = model.item_in is None
        self.mm_dtype = torch.bfloat16 if trainer.use_amp else None
        self.step_tensor = torch.zeros((), device=dev)  # [] Adam's step count, as a tensor (static graphs)
        self.compiled = self.cfg.compile is True  # "auto" is resolved by the trainer's prepare()
        if self.compiled:  # one graph: forward, backward and update fused by inductor (static shapes)
            self.run = torch.compile(self.run, dynamic=False)

    def _mm(self, a: Tensor, b: Tensor) -> Tensor:
        """a @ b, in bf16 with an fp32 result under ``train.amp`` on CUDA (the plain step's autocast)."""
        if self.mm_dtype is None:
            return a @ b
        return (a.to(self.mm_dtype) @ b.to(self.mm_dtype)).float()

    def _linear(self, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        """x @ w.T + b. Eager: one ``addmm``. Compiled: the product alone, so that inductor adds the bias
        inside the kernel that reads the result anyway (``addmm`` first copies the broadcast bias into
        the output, ~25 us for the [B, C] scores on one core)."""
        if self.mm_dtype is None and not self.compiled:
            return torch.addmm(b, x, w.t())
        return self._mm(x, w.t()) + b

    def __call__(
        self,
        inputs: Tensor,
        targets: Tensor,
        keep: Tensor,
        active: Tensor,
        negs: Tensor,
        state: Tensor,
        seen: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """One update (see ``run``)."""
        self.count_step()
        return self.run(inputs, targets, keep, active, negs, state, seen)

    def count_step(self) -> None:
        """The optimiser's step counter lives in Python, outside the tensor code (which a graph replays)."""
        opt = self.trainer.optimizer
        opt.step_count += 1
        if opt.kind == "adam":
            self.step_tensor.fill_(opt.step_count)

    @torch.no_grad()
    def run(
        self,
        inputs: Tensor,
        targets: Tensor,
        keep: Tensor,
        active: Tensor,
        negs: Tensor,
        state: Tensor,
        seen: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """One update; inputs/targets [B], keep [B] float, active [B] bool, negs [n_sample],
        state [n_layers, B, S], seen [B, n_items] bool or None (updated in place).

        Returns (loss [], new state [n_layers, B, S]).
        """
        model, cfg, mm = self.model, self.cfg, self._mm
        B = inputs.shape[0]
        state = state * keep.view(1, -1, 1)  # [n_layers, B, S]
        cols = torch.cat([targets, negs])  # [C]
        seen_cols = None
        if seen is not None:
            seen.mul_(keep.view(-1, 1).to(seen.dtype))  # [B, n_items]
            seen.index_put_((self.trainer.rows[:B], inputs), self.true)  # [B, n_items] (device scalar)
            seen_cols = seen.index_select(1, cols)  # [B, C]
        C = cols.shape[0]
        if self.shared:  # one gather for the output and the input rows (one table)
            out_idx = torch.cat([cols, inputs])  # [C + B]
            rows = model.item_out.index_select(0, out_idx)  # [C + B, H]
            out_rows, in_rows = rows[:C], rows[C:]  # [C, H], [B, H]
        else:
            out_rows = model.item_out.index_select(0, cols)  # [C, H]
            in_rows = model.item_in.index_select(0, inputs)  # [B, I]
        bias_rows = model.item_bias.index_select(0, cols)  # [C]

        # --- forward --------------------------------------------------------------------------------
        caches: list[_LayerCache] = []
        emb_drop = dropout_mask(in_rows, model.dropout_embed) if model.dropout_embed else None
        x = in_rows * emb_drop if emb_drop is not None else in_rows  # [B, I]
        new_states = []
        for i, layer in enumerate(model.layers):
            gx = layer.project(x) if layer.w_ih is None else self._linear(x, layer.w_ih, layer.bias)  # [B,gH]
            h_new, s_new, acts = _cell_forward(layer, gx, state[i])
            drop = dropout_mask(h_new, model.dropout_hidden) if model.dropout_hidden else None
            caches.append(_LayerCache(x, state[i, :, : layer.hidden_size], acts, drop))
            new_states.append(s_new)
            x = h_new * drop if drop is not None else h_new  # [B, H]
        out = x  # [B, H]
        scores = self._linear(out, out_rows, bias_rows)  # [B, C]
        if model.history_bias is not None and seen_cols is not None:
            scores = scores + model.history_bias * seen_cols  # [B, C]
        col_valid = torch.cat([active, self.sample_valid])  # [C]
        mask = (cols.unsqueeze(0) == targets.unsqueeze(1)) | ~col_valid.unsqueeze(0)  # [B, C] not a negative
        if self.trainer.mask_seen and seen_cols is not None:
            mask = mask | seen_cols  # [B, C]
        mask = mask & self.off_diagonal  # [B, C] the positive itself stays (as losses.negative_mask)
        if cfg.logq > 0:
            scores = scores - cfg.logq * self.trainer.sampler.log_prob[cols].unsqueeze(0)  # [B, C]
        weight = active.to(scores.dtype) / B  # [B]
        if cfg.loss == "cross_entropy":
            loss, d_scores = cross_entropy_grad(scores, mask, weight, self.eye)  # [], [B, C]
        else:
            if cfg.elu_param > 0:
                pre = scores
                scores = torch.nn.functional.elu(pre, alpha=cfg.elu_param)  # [B, C]
            loss, d_scores = bpr_max_grad(scores, mask, weight, self.eye, cfg.bpreg)
            if cfg.elu_param > 0:
                d_scores = aten.elu_backward(d_scores, cfg.elu_param, 1.0, 1.0, False, pre)  # [B, C]

        # --- backward -------------------------------------------------------------------------------
        grads: dict[Tensor, Tensor] = {}
        if model.history_bias is not None and seen_cols is not None:
            grads[model.history_bias] = (d_scores * seen_cols).sum()  # []
        d_out_rows = mm(d_scores.t(), out)  # [C, H]
        d_bias_rows = d_scores.sum(dim=0)  # [C]
        dx = mm(d_scores, out_rows)  # [B, H]
        for layer, cache in zip(reversed(model.layers), reversed(caches), strict=True):
            if cache.drop is not None:
                dx = dx * cache.drop  # [B, H]
            dgx, dgh = _cell_backward(layer, dx, cache)  # [B, gH] each
            grads[layer.w_hh] = mm(dgh.t(), cache.h)  # [gH, H]
            grads[layer.bias] = dgx.sum(dim=0)  # [gH]
            if layer.w_ih is None:
                dx = dgx  # [B, gH] one-hot input rows
            else:
                grads[layer.w_ih] = mm(dgx.t(), cache.x)  # [gH, I]
                dx = mm(dgx, layer.w_ih)  # [B, I]
        d_in_rows = dx * emb_drop if emb_drop is not None else dx  # [B, I]

        # --- update ---------------------------------------------------------------------------------
        params = [p for p in self.dense if p in grads]
        sparse = {"item_bias": (cols, d_bias_rows)}
        if self.shared:
            sparse["item_out"] = (out_idx, torch.cat([d_out_rows, d_in_rows]))
        else:
            sparse["item_out"] = (cols, d_out_rows)
            sparse["item_in"] = (inputs, d_in_rows)
        self.trainer.optimizer.update(params, [grads[p] for p in params], sparse, self.step_tensor)
        return loss, torch.stack(new_states)  # [], [n_layers, B, S]
