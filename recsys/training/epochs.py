"""One training epoch as the selection run and the refit both run it: threads, progress, RNG state.

Kept apart from the epoch loop (recsys.training.train) so each reads on one screen.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from recsys.config import TrainConfig
from recsys.data.sequences import SequenceSet
from recsys.model.batching import plan_epoch
from recsys.model.step import SessionParallelTrainer

log = logging.getLogger(__name__)


@contextmanager
def _cpu_threads(device: torch.device, threads: int | None):
    """The training step is latency bound at GRU4Rec sizes: one thread was fastest on 2 cores (measured)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads or 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class _Progress:
    """Rich progress bar on a terminal, periodic plain log lines otherwise."""

    def __init__(self, epoch: int, n_steps: int, n_events: int) -> None:
        self.epoch, self.n_steps, self.n_events = epoch, n_steps, n_events
        self.t0 = time.perf_counter()
        self.last_log = self.t0
        self.bar = None
        if sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn(f"epoch {epoch}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TextColumn("{task.fields[rate]:>9,.0f} ev/s  loss {task.fields[loss]:.4f}"),
                TimeRemainingColumn(),
                transient=True,
            )
            self.task = self.bar.add_task("train", total=n_steps, rate=0.0, loss=float("nan"))
            self.bar.start()

    def update(self, done: int, losses: torch.Tensor) -> None:
        now = time.perf_counter()
        rate = self.n_events * done / max(self.n_steps, 1) / max(now - self.t0, 1e-9)
        if self.bar is not None:
            loss = float(losses[max(0, done - 50) : done].mean())
            self.bar.update(self.task, completed=done, rate=rate, loss=loss)
        elif now - self.last_log >= 10 or done == self.n_steps:
            loss = float(losses[max(0, done - 50) : done].mean())
            log.info(
                "epoch %d: step %d/%d, %.0f events/s, loss %.4f", self.epoch, done, self.n_steps, rate, loss
            )
            self.last_log = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def run_epoch(
    trainer: SessionParallelTrainer, seqs: SequenceSet, cfg: TrainConfig, epoch: int, device: torch.device
) -> tuple[float, int, float]:
    """One epoch over ``seqs`` (order reshuffled from the seed and epoch): (mean loss, events, seconds)."""
    plan = plan_epoch(seqs, cfg.batch_size, np.random.default_rng([cfg.seed, epoch]),
                      by_start_time=cfg.epoch_order == "start_time")
    dplan = plan.to_torch(device)
    with _cpu_threads(device, cfg.threads):
        # train.compile: compiled before the clock starts (auto decides from the run's length)
        seconds = trainer.prepare(plan.inputs.shape[1], steps_per_epoch=plan.n_steps)
    if seconds:
        log.info("compiled the training step in %.1f s", seconds)
    progress = _Progress(epoch, plan.n_steps, plan.n_events)
    t0 = time.perf_counter()
    try:
        with _cpu_threads(device, cfg.threads):
            loss = trainer.run_epoch(dplan, epoch, on_steps=progress.update)
    finally:
        progress.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return loss, plan.n_events, time.perf_counter() - t0
