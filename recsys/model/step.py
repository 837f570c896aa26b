"""One session-parallel training step, and an epoch of them, for :class:`GRU4Rec`.

The step gathers the item rows it needs (outputs of the batch targets + shared negatives, biases, input
rows) as detached leaves, runs one recurrent step and the sampled loss, back-propagates, and hands the
row gradients to the row-sparse optimiser. The hidden state is carried between steps (detached: one-step
truncated back-propagation, as in GRU4Rec) and zeroed per slot exactly where a new sequence starts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import torch
from torch import Tensor

from recsys.config import TrainConfig
from recsys.model.allocator import retain_freed_memory
from recsys.model.batching import DevicePlan
from recsys.model.fused_step import FusedStep
from recsys.model.gru4rec import GRU4Rec
from recsys.model.losses import sampled_loss
from recsys.model.optim import SparseRowOptimizer
from recsys.model.sampling import NegativeSampler
from recsys.model.static_step import StaticStep

log = logging.getLogger(__name__)

TABLES = ("item_out", "item_bias", "item_in")
# train.compile=auto compiles a CPU run of at least this many steps (epochs x steps per epoch): at the
# issue's setting the compiled step saves ~0.8 ms of ~1.8 ms, so 30,000 steps save ~25 s, what a cold
# compile costs on a 2-core box (a warm one, from inductor's disk cache, takes 3-5 s). Shorter runs (the
# tests, the demo, small tuning trials) stay eager. docs/training-speed.md.
AUTO_COMPILE_MIN_STEPS = 30_000


def should_compile(cfg: TrainConfig, device: torch.device, steps_per_epoch: int) -> bool:
    """``train.compile`` resolved for one run: true/false as set; auto as described at AUTO_COMPILE_MIN_STEPS.

    Only the fast step is ever compiled; on CUDA auto stays off (unmeasured there; CUDA graphs are the
    GPU's way to cut per-step overhead)."""
    if cfg.compile != "auto":
        return bool(cfg.compile)
    return cfg.fast_step and device.type == "cpu" and cfg.epochs * steps_per_epoch >= AUTO_COMPILE_MIN_STEPS


def rng_snapshot(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def rng_restore(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


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
        static: bool | None = None,
    ) -> None:
        """``mask_seen``: take history items out of each row's negatives (default: the config's
        ``mask_seen_negatives``, off when unset; ``train_model`` passes the resolved rule).
        ``static``: run the fast step on fixed buffers (recsys.model.static_step; default: on where
        ``train.cuda_graphs`` captures it, i.e. on CUDA); tests turn it on for CPU."""
        plain_only = [name for name, on in (
            ("train.logq_targets=count", cfg.logq_targets == "count"),
            ("train.mask_duplicate_targets=false", not cfg.mask_duplicate_targets),
            ("model.dropout_state=true", model.config.dropout_state),
        ) if on]
        if plain_only and cfg.fast_step:  # published-GRU4Rec options the hand-written step does not implement
            log.info("training with the plain step: the fast step lacks %s", ", ".join(plain_only))
            cfg = cfg.model_copy(update={"fast_step": False})
        if cfg.cuda_graphs and not cfg.fast_step:
            raise ValueError("train.cuda_graphs needs train.fast_step=true (the plain step is not static)")
        if device.type == "cpu":
            retain_freed_memory()  # no page faults per step (the first-epoch slowdown): see allocator
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
        self.use_amp = cfg.amp and device.type == "cuda"
        bf16 = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
        self.autocast = bf16 if self.use_amp else nullcontext
        self.rows = torch.arange(cfg.batch_size, device=device)  # [B] slot index, for the history bitmap
        # train.fast_step: the hand-written step (recsys.model.fused_step), built for the first batch size
        self.graphs = cfg.cuda_graphs and device.type == "cuda"
        self.static = self.graphs if static is None else static
        self._fused: FusedStep | StaticStep | None = None
        self._fused_batch = 0
        self._forward = (  # the plain step compiles its forward only when asked to explicitly
            torch.compile(self._forward_loss, dynamic=False) if cfg.compile is True else self._forward_loss
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

        Returns (loss [] detached, new state [n_layers, B, S] detached). ``train.fast_step`` picks the
        hand-written step; otherwise autograd over the plain network (the reference path).
        """
        if self.cfg.fast_step:
            return self.fast_step(inputs, targets, keep, active, state)
        return self.plain_step(inputs, targets, keep, active, state)

    def fast_step(self, inputs: Tensor, targets: Tensor, keep: Tensor, active: Tensor | None, state: Tensor):
        """The hand-written step (recsys.model.fused_step): same arguments and results as ``step``."""
        B = inputs.shape[0]
        if self._fused is None or self._fused_batch != B:
            self._fused_batch = B
            fused = FusedStep(self, B)
            self.all_active = fused.all_active  # [B]
            self._fused = (
                StaticStep(fused, len(self.model.layers), self.model.state_size, self.graphs)
                if self.static
                else fused
            )
        if active is None:
            active = self.all_active
        if self.rows.shape[0] < B:
            self.rows = torch.arange(B, device=self.device)  # [B]
        return self._fused(inputs, targets, keep, active, self.sampler.draw(), state, self.seen)

    def prepare(self, batch_size: int, force: bool = False, steps_per_epoch: int | None = None) -> float:
        """Compile the fast step (``train.compile``) before an epoch's clock starts; returns the seconds.

        ``train.compile=auto`` is decided here, once, from ``steps_per_epoch`` (the first epoch's plan;
        without it auto means off). Runs one step on dummy inputs and then puts back everything it
        changed (parameters, optimiser state, sampler stream, RNG, history bitmap), so training is exactly
        as if it had not run; the compiled code (and inductor's on-disk cache) stays. A no-op without
        ``compile`` (unless ``force``) or once done.
        """
        if self.cfg.compile == "auto":
            on = should_compile(self.cfg, self.device, steps_per_epoch or 0)
            self.cfg = self.cfg.model_copy(update={"compile": on})
            if on:
                log.info("train.compile=auto: compiling the step (%d epochs x %d steps)", self.cfg.epochs,
                         steps_per_epoch)
        if not self.cfg.fast_step or self._fused_batch == batch_size or not (self.cfg.compile or force):
            return 0.0
        t0 = time.perf_counter()
        model, opt = self.model, self.optimizer
        saved_tensors = [t.clone() for t in self._mutable_tensors()]
        saved = (opt.step_count, self.sampler.state_dict(), rng_snapshot(self.device), self.seen)
        B = batch_size
        if self.track_seen:
            self.seen = torch.zeros(B, model.n_items, dtype=torch.bool, device=self.device)  # [B, n_items]
        # distinct tensors, as in training: the compiled code is specialised on which arguments alias
        inputs = torch.zeros(B, dtype=torch.int64, device=self.device)  # [B]
        targets = torch.zeros(B, dtype=torch.int64, device=self.device)  # [B]
        keep = torch.zeros(B, device=self.device)  # [B]
        self.fast_step(inputs, targets, keep, None, model.init_state(B, self.device))
        for dst, src in zip(self._mutable_tensors(), saved_tensors, strict=True):
            dst.copy_(src)
        opt.step_count, sampler_state, rng, self.seen = saved
        self.sampler.load_state_dict(sampler_state)
        rng_restore(rng, self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def _mutable_tensors(self) -> list[Tensor]:
        """Every tensor a step updates in place (what ``prepare`` must restore)."""
        opt = self.optimizer
        tables = [*opt.table_acc.values(), *opt.table_vel.values()]
        return [p.data for p in self.model.parameters()] + opt.dense_acc + opt.dense_vel + tables

    def plain_step(self, inputs: Tensor, targets: Tensor, keep: Tensor, active: Tensor | None, state: Tensor):
        """Autograd over the network's own forward: the reference the fast step is tested against."""
        model = self.model
        state = state * keep.view(1, -1, 1)  # [n_layers, B, S] zero the slots that start a sequence
        negs = self.sampler.draw()  # [n_sample]
        cols = torch.cat([targets, negs])  # [C] = [B + n_sample]
        seen_cols = None
        if self.seen is not None:  # history of every slot's current sequence, as an item bitmap
            self.seen.mul_(keep.view(-1, 1).to(self.seen.dtype))  # [B, n_items] forget finished sequences
            self.seen[self.rows[: inputs.shape[0]], inputs] = True  # [B, n_items]
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
        if self.track_seen:  # one buffer for the run (a captured CUDA graph holds its address)
            if self.seen is None or self.seen.shape[0] != B:
                self.seen = torch.zeros(B, self.model.n_items, dtype=torch.bool, device=self.device)  # [B, n]
            else:
                self.seen.zero_()
        if self.rows.shape[0] < B:
            self.rows = torch.arange(B, device=self.device)  # [B]
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
