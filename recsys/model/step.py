"""One session-parallel training step, and an epoch of them, for :class:`GRU4Rec`.

The step gathers the item rows it needs (outputs of the batch targets + shared negatives, biases, input
rows) as detached leaves, runs one recurrent step and the sampled loss, back-propagates, and hands the
row gradients to the row-sparse optimiser. The hidden state is carried between steps (detached: one-step
truncated back-propagation, as in GRU4Rec) and zeroed per slot exactly where a new sequence starts.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import torch
from torch import Tensor

from recsys.config import TrainConfig
from recsys.model.batching import DevicePlan
from recsys.model.gru4rec import GRU4Rec
from recsys.model.losses import sampled_loss
from recsys.model.optim import SparseRowOptimizer
from recsys.model.sampling import NegativeSampler

TABLES = ("item_out", "item_bias", "item_in")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the message names the epoch and step."""


def build_optimizer(model: GRU4Rec, cfg: TrainConfig) -> SparseRowOptimizer:
    tables = {name: getattr(model, name) for name in TABLES if getattr(model, name, None) is not None}
    dense = [p for name, p in model.named_parameters() if name not in tables]
    return SparseRowOptimizer(
        dense,
        tables,
        kind=cfg.optimizer,
        lr=cfg.learning_rate,
        momentum=cfg.momentum,
        grad_clip=cfg.grad_clip,
    )


class SessionParallelTrainer:
    """Owns the carried hidden state, the sampler and the optimiser of one training run."""

    def __init__(
        self,
        model: GRU4Rec,
        cfg: TrainConfig,
        counts: np.ndarray,
        device: torch.device,
        mask_seen: bool | None = None,
    ) -> None:
        """``mask_seen``: take history items out of each row's negatives (default: the config's
        ``mask_seen_negatives``, off when unset; ``train_model`` passes the resolved rule)."""
        self.model = model
        self.mask_seen = bool(cfg.mask_seen_negatives) if mask_seen is None else mask_seen
        self.cfg = cfg
        self.device = device
        self.optimizer = build_optimizer(model, cfg)
        self.sampler = NegativeSampler(
            counts, cfg.n_sample, cfg.sample_alpha, cfg.sample_store_batches, device, cfg.seed + 1
        )
        self.shared = model.item_in is None
        # [B, n_items] bool history bitmap: for mask_seen and for the model's learned history bias
        self.track_seen = self.mask_seen or model.history_bias is not None
        self.seen: Tensor | None = None
        use_amp = cfg.amp and device.type == "cuda"
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else nullcontext
        self._forward = (
            torch.compile(self._forward_loss, dynamic=False) if cfg.compile else self._forward_loss
        )

    def _forward_loss(
        self,
        in_rows: Tensor,
        out_rows: Tensor,
        bias_rows: Tensor,
        state: Tensor,
        cols: Tensor,
        targets: Tensor,
        active: Tensor | None,
        seen_cols: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Loss and new state of one step from gathered leaves (a pure function: compilable).

        ``seen_cols`` [B, C] bool: column j's item is already in row i's sequence (history bitmap).
        """
        with self.autocast():
            out, new_state = self.model.step_rows(in_rows, state)  # [B, H], [n_layers, B, S]
            scores = torch.addmm(bias_rows, out, out_rows.t()).float()  # [B, C]
        if self.model.history_bias is not None and seen_cols is not None:
            scores = scores + self.model.history_bias * seen_cols  # [B, C] learned repeat offset
        loss = sampled_loss(
            scores,
            cols,
            targets,
            active,
            loss=self.cfg.loss,
            bpreg=self.cfg.bpreg,
            elu_param=self.cfg.elu_param,
            logq=self.cfg.logq,
            log_prob=self.sampler.log_prob,
            extra_mask=seen_cols if self.mask_seen else None,
            log_prob_targets=self.sampler.log_count if self.cfg.logq_targets == "count" else None,
            mask_duplicates=self.cfg.mask_duplicate_targets,
        )  # []
        return loss, new_state.float()  # state stays fp32 between steps even under bf16 autocast

    def step(self, inputs: Tensor, targets: Tensor, keep: Tensor, active: Tensor | None, state: Tensor):
        """One update. inputs/targets [B], keep [B] (0 = reset), active [B] or None; state [n_layers, B, S].

        Returns (loss [] detached, new state [n_layers, B, S] detached).
        """
        model = self.model
        state = state * keep.view(1, -1, 1)  # [n_layers, B, S] zero the slots that start a sequence
        negs = self.sampler.draw()  # [n_sample]
        cols = torch.cat([targets, negs])  # [C] = [B + n_sample]
        seen_cols = None
        if self.seen is not None:  # history of every slot's current sequence, as an item bitmap
            self.seen.mul_(keep.view(-1, 1).to(self.seen.dtype))  # [B, n_items] forget finished sequences
            self.seen[self._rows[: inputs.shape[0]], inputs] = True  # [B, n_items]
            seen_cols = self.seen.index_select(1, cols)  # [B, C]
        out_rows = model.item_out.detach().index_select(0, cols).requires_grad_()  # [C, H]
        bias_rows = model.item_bias.detach().index_select(0, cols).requires_grad_()  # [C]
        table = model.item_out if self.shared else model.item_in
        in_rows = table.detach().index_select(0, inputs).requires_grad_()  # [B, I]
        loss, new_state = self._forward(in_rows, out_rows, bias_rows, state, cols, targets, active, seen_cols)
        loss.backward()
        sparse = {"item_bias": (cols, bias_rows.grad)}
        if self.shared:  # input and output rows are one table: one update over both index sets
            sparse["item_out"] = (torch.cat([cols, inputs]), torch.cat([out_rows.grad, in_rows.grad]))
        else:
            sparse["item_out"] = (cols, out_rows.grad)
            sparse["item_in"] = (inputs, in_rows.grad)
        self.optimizer.step(sparse)
        return loss.detach(), new_state.detach()

    def run_epoch(
        self,
        plan: DevicePlan,
        epoch: int,
        on_steps: Callable[[int, Tensor], None] | None = None,
        check_every: int | None = None,
    ) -> float:
        """All steps of one epoch; returns the mean loss over steps.

        Losses stay on the device in a buffer and are checked for NaN/inf every ``check_every`` steps
        (1 on CPU, 100 on CUDA: a check is a host sync) so the error still names the exact step.
        ``on_steps(n_done, losses_so_far)`` is called at each check (progress reporting).
        """
        self.model.train()
        T, B = plan.inputs.shape
        check_every = check_every or (100 if self.device.type == "cuda" else 50)
        losses = torch.zeros(T, device=self.device)  # [T]
        state = self.model.init_state(B, self.device)  # [n_layers, B, S]
        if self.track_seen:
            self.seen = torch.zeros(B, self.model.n_items, dtype=torch.bool, device=self.device)  # [B, n]
            self._rows = torch.arange(B, device=self.device)  # [B]
        checked = 0
        for t in range(T):
            active = None if plan.all_active[t] else plan.active[t]
            loss, state = self.step(plan.inputs[t], plan.targets[t], plan.keep[t], active, state)
            losses[t] = loss
            if t + 1 - checked >= check_every or t + 1 == T:
                self._check(losses, checked, t + 1, epoch)
                checked = t + 1
                if on_steps is not None:
                    on_steps(checked, losses)
        return float(losses.mean()) if T else 0.0

    @staticmethod
    def _check(losses: Tensor, lo: int, hi: int, epoch: int) -> None:
        window = losses[lo:hi]  # [hi - lo]
        bad = ~torch.isfinite(window)
        if bool(bad.any()):
            step = lo + int(bad.nonzero()[0, 0])
            raise NonFiniteLossError(
                f"non-finite training loss ({float(window[step - lo])}) at epoch {epoch}, step {step}: "
                "lower train.learning_rate or set train.grad_clip"
            )

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
