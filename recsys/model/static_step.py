"""The fast step on fixed buffers, replayed as a CUDA graph (``train.cuda_graphs``) when on a GPU.

A CUDA graph replays recorded kernels on fixed memory: every tensor the step reads must live at the
same address at every step. :class:`StaticStep` owns one buffer per step input (items, targets, keep,
active, negatives, carried state); each step copies the new values in (device to device: the epoch
plan and the sampler's store are already on the device) and runs :meth:`FusedStep.run` on the buffers.
With ``graph=True`` (CUDA only) it runs two steps eagerly on a side stream (real updates: they warm up
the kernels and allocator, as ``torch.cuda.graph`` requires), captures the third and from then on
replays it, so a step costs a few copies and one launch. Without a graph the same buffers and code run
eagerly: that is what the CPU test compares with the dynamic path.

Everything the step touches besides its inputs (parameters, optimiser state, the history bitmap,
Adam's step tensor) is updated in place by ``run``, so it too keeps its address.
"""

from __future__ import annotations

import torch
from torch import Tensor

from recsys.model.fused_step import FusedStep

WARMUP_STEPS = 2  # eager steps on a side stream before the capture


class StaticStep:
    """Fixed-address inputs for :class:`FusedStep`, optionally captured as a CUDA graph."""

    def __init__(self, fused: FusedStep, n_layers: int, state_size: int, graph: bool) -> None:
        dev = fused.trainer.device
        if graph and dev.type != "cuda":
            raise ValueError("train.cuda_graphs needs train.device=cuda")
        B, S = fused.batch_size, fused.cfg.n_sample
        self.fused = fused
        self.graph_wanted = graph
        self.inputs = torch.zeros(B, dtype=torch.int64, device=dev)  # [B]
        self.targets = torch.zeros(B, dtype=torch.int64, device=dev)  # [B]
        self.keep = torch.zeros(B, device=dev)  # [B]
        self.active = torch.ones(B, dtype=torch.bool, device=dev)  # [B]
        self.negs = torch.zeros(S, dtype=torch.int64, device=dev)  # [n_sample]
        self.state = torch.zeros(n_layers, B, state_size, device=dev)  # [n_layers, B, S]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: tuple[Tensor, Tensor] | None = None  # (loss [], new state) written by each replay
        self.seen: Tensor | None = None
        self.n_eager = 0

    def __call__(
        self, inputs: Tensor, targets: Tensor, keep: Tensor, active: Tensor, negs: Tensor, state: Tensor,
        seen: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Same contract as ``FusedStep.__call__``; the returned tensors are overwritten by the next step."""
        self.inputs.copy_(inputs)
        self.targets.copy_(targets)
        self.keep.copy_(keep)
        self.active.copy_(active)
        self.negs.copy_(negs)
        if state.data_ptr() != self.state.data_ptr():
            self.state.copy_(state)  # [n_layers, B, S]
        self.fused.count_step()
        if self.graph is not None and seen is not self.seen:
            self.graph, self.n_eager = None, 0  # the history bitmap moved: warm up and capture again
        if self.graph is not None:
            self.graph.replay()
            return self.out
        if self.graph_wanted and self.n_eager >= WARMUP_STEPS:
            return self._capture(seen)
        self.n_eager += 1
        self.seen = seen
        if not self.graph_wanted:
            return self._run(seen)
        side = torch.cuda.Stream()  # warm-up steps run on a side stream, as capture requires
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self._run(seen)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _run(self, seen: Tensor | None) -> tuple[Tensor, Tensor]:
        loss, new_state = self.fused.run(
            self.inputs, self.targets, self.keep, self.active, self.negs, self.state, seen
        )
        self.state.copy_(new_state)  # the next step reads its state from the same buffer
        return loss, self.state

    def _capture(self, seen: Tensor | None) -> tuple[Tensor, Tensor]:
        """Record one step (nothing runs during capture), then replay it once for this step."""
        self.graph = torch.cuda.CUDAGraph()
        self.seen = seen
        with torch.cuda.graph(self.graph):
            self.out = self._run(seen)
        self.graph.replay()
        return self.out
