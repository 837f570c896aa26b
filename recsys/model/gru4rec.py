"""GRU4Rec network (Hidasi et al. 2016; Hidasi & Karatzoglou 2018), written from the papers.

One recurrent stack over item sequences with a per-item output layer (``item_out`` rows and
``item_bias``). The recurrent cells are written out gate by gate so that the input projection of every
position can be computed in one matmul (or, with ``embedding: none``, looked up as a row of a trainable
``[n_items, gates * H]`` matrix, which is exactly a one-hot input times a weight matrix) and only the
recurrent part runs position by position.

``history_bias`` (``model.history_bias``, an extension, not in the papers) is one learned scalar added
to the scores of items already in the sequence; the training step, evaluation and scoring supply the
history, since ``score_items`` sees only the state.

Hidden state layout: ``[n_layers, B, H]`` for gru/rnn, ``[n_layers, B, 2H]`` for lstm (h then c), so a
slot reset is one multiply by a keep mask.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from recsys.config import ModelConfig

GATES = {"gru": 3, "lstm": 4, "rnn": 1}


def _uniform_(t: Tensor, fan_in: int, fan_out: int) -> None:
    """Glorot-uniform init, the scheme GRU4Rec uses for every weight matrix."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        t.uniform_(-bound, bound)


class RecurrentLayer(nn.Module):
    """One gru/lstm/rnn layer with explicit gates; input projection done outside the time loop."""

    def __init__(self, cell: str, input_size: int, hidden_size: int, project_input: bool) -> None:
        super().__init__()
        self.cell = cell
        self.hidden_size = hidden_size
        g = GATES[cell]
        # project_input=False: the caller supplies input gate pre-activations directly ([.., g*H]).
        self.w_ih = nn.Parameter(torch.empty(g * hidden_size, input_size)) if project_input else None
        self.w_hh = nn.Parameter(torch.empty(g * hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.zeros(g * hidden_size))
        if self.w_ih is not None:
            _uniform_(self.w_ih, input_size, hidden_size)
        _uniform_(self.w_hh, hidden_size, hidden_size)
        if cell == "lstm":
            with torch.no_grad():  # forget-gate bias 1: the usual LSTM start
                self.bias[hidden_size : 2 * hidden_size] = 1.0

    @property
    def state_size(self) -> int:
        return 2 * self.hidden_size if self.cell == "lstm" else self.hidden_size

    def project(self, x: Tensor) -> Tensor:
        """Input gate pre-activations: ``x @ w_ih.T + bias``; x is [..., I] -> [..., g*H]."""
        if self.w_ih is None:
            return x + self.bias  # [..., g*H] already projected (one-hot input rows)
        return F.linear(x, self.w_ih, self.bias)  # [..., g*H]

    def cell_step(self, gx: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One position: gx [B, g*H] input pre-activations, state [B, S] -> (out [B, H], state [B, S])."""
        H = self.hidden_size
        if self.cell == "gru":
            h = state  # [B, H]
            gh = h @ self.w_hh.t()  # [B, 3H]
            rz = torch.sigmoid(gx[:, : 2 * H] + gh[:, : 2 * H])  # [B, 2H]
            r, z = rz[:, :H], rz[:, H:]  # [B, H] each
            n = torch.tanh(gx[:, 2 * H :] + r * gh[:, 2 * H :])  # [B, H]
            h_new = n + z * (h - n)  # [B, H]  = (1-z)*n + z*h
            return h_new, h_new
        if self.cell == "lstm":
            h, c = state[:, :H], state[:, H:]  # [B, H] each
            gates = gx + h @ self.w_hh.t()  # [B, 4H]
            ifo = torch.sigmoid(gates[:, : 3 * H])  # [B, 3H] input, forget, output gates
            g = torch.tanh(gates[:, 3 * H :])  # [B, H] candidate
            c_new = ifo[:, H : 2 * H] * c + ifo[:, :H] * g  # [B, H]
            h_new = ifo[:, 2 * H :] * torch.tanh(c_new)  # [B, H]
            return h_new, torch.cat([h_new, c_new], dim=1)  # [B, H], [B, 2H]
        h_new = torch.tanh(gx + state @ self.w_hh.t())  # [B, H] plain Elman RNN
        return h_new, h_new


class GRU4Rec(nn.Module):
    """Session-based recurrent recommender; API shared with evaluation and scoring (CONTRACTS.md)."""

    def __init__(self, n_items: int, config: ModelConfig) -> None:
        super().__init__()
        self.n_items = n_items
        self.config = config
        H = config.hidden_size
        g = GATES[config.cell]
        self.hidden_size = H
        # Output layer: one row per item (and, with the shared embedding, the input embedding too).
        self.item_out = nn.Parameter(torch.empty(n_items, H))  # [n_items, H]
        self.item_bias = nn.Parameter(torch.zeros(n_items))  # [n_items]
        _uniform_(self.item_out, n_items, H)
        if config.embedding == "shared":
            self.item_in = None
            input_size, project = H, True
        elif config.embedding == "separate":
            dim = config.embedding_dim or H
            self.item_in = nn.Parameter(torch.empty(n_items, dim))  # [n_items, E]
            _uniform_(self.item_in, n_items, dim)
            input_size, project = dim, True
        else:  # one-hot input: the first layer's input weights are a row lookup
            self.item_in = nn.Parameter(torch.empty(n_items, g * H))  # [n_items, g*H]
            _uniform_(self.item_in, n_items, H)
            input_size, project = g * H, False
        layers = [RecurrentLayer(config.cell, input_size, H, project)]
        layers += [RecurrentLayer(config.cell, H, H, True) for _ in range(config.n_layers - 1)]
        self.layers = nn.ModuleList(layers)
        # Scalar added to the score of every item already in the sequence: the data decide whether a
        # repeat is likely (re-watched series: > 0) or not (rated films: < 0); the GRU state alone
        # cannot remember a long history's item set. Absent (no parameter) when disabled.
        self.history_bias = nn.Parameter(torch.zeros(())) if config.history_bias else None  # []
        self.dropout_embed = config.dropout_embed
        self.dropout_hidden = config.dropout_hidden

    # --- pieces -------------------------------------------------------------------------------------

    @property
    def state_size(self) -> int:
        return self.layers[0].state_size

    def init_state(self, batch: int, device: torch.device | str | None = None) -> Tensor:
        """Zero state for ``batch`` sequences: [n_layers, B, S]."""
        device = device if device is not None else self.item_out.device
        return torch.zeros(len(self.layers), batch, self.state_size, device=device)  # [n_layers, B, S]

    def input_table(self) -> Tensor:
        """The matrix whose rows are the inputs of the first layer: [n_items, I]."""
        return self.item_out if self.item_in is None else self.item_in  # [n_items, I]

    def embed(self, rows: Tensor) -> Tensor:
        """Input rows (already looked up, [..., I]) -> first-layer gate pre-activations [..., g*H]."""
        x = F.dropout(rows, self.dropout_embed, self.training) if self.dropout_embed else rows  # [..., I]
        return self.layers[0].project(x)  # [..., g*H]

    def _drop_hidden(self, h: Tensor) -> Tensor:
        return F.dropout(h, self.dropout_hidden, self.training) if self.dropout_hidden else h  # [B, H]

    def step_rows(self, in_rows: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One session-parallel step from looked-up input rows.

        in_rows [B, I]; state [n_layers, B, S] -> (output [B, H] after hidden dropout, new state
        [n_layers, B, S]). Training gathers the rows itself so that their gradient stays row-sparse.
        """
        gx = self.embed(in_rows)  # [B, g*H]
        new_states = []
        out = gx
        for i, layer in enumerate(self.layers):
            if i > 0:
                gx = layer.project(out)  # [B, g*H]
            h, s = layer.cell_step(gx, state[i])  # [B, H], [B, S]
            out = self._drop_hidden(h)  # [B, H]
            new_states.append(out if self.config.dropout_state and layer.cell != "lstm" else s)
        return out, torch.stack(new_states)  # [B, H], [n_layers, B, S]

    def step(self, items: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One step from item indices: items [B] -> (output [B, H], new state [n_layers, B, S])."""
        return self.step_rows(F.embedding(items, self.input_table()), state)  # rows [B, I]

    # --- contract API -------------------------------------------------------------------------------

    def sequence_outputs(self, items: Tensor, lengths: Tensor) -> Tensor:
        """Output after every position: items [B, L] (right-padded), lengths [B] -> [B, L, H].

        Causal, so padding after ``length`` never affects earlier positions.
        """
        B, L = items.shape
        x = F.embedding(items, self.input_table())  # [B, L, I]
        gx = self.embed(x)  # [B, L, g*H]
        for i, layer in enumerate(self.layers):
            if i > 0:
                gx = layer.project(x)  # [B, L, g*H]
            state = torch.zeros(B, layer.state_size, device=items.device, dtype=gx.dtype)  # [B, S]
            outs = []
            for t in range(L):
                h, state = layer.cell_step(gx[:, t], state)  # [B, H], [B, S]
                outs.append(h)
            x = F.dropout(torch.stack(outs, dim=1), self.dropout_hidden, self.training)  # [B, L, H]
        return x  # [B, L, H]

    def final_states(self, items: Tensor, lengths: Tensor) -> Tensor:
        """Output at position ``length - 1``: items [B, L], lengths [B] -> [B, H]."""
        out = self.sequence_outputs(items, lengths)  # [B, L, H]
        idx = (lengths.to(items.device) - 1).clamp(min=0)  # [B]
        return out[torch.arange(len(idx), device=items.device), idx]  # [B, H]

    def add_history_bias(self, scores: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        """Adds the learned repeat offset (``model.history_bias``) to history items, in place.

        scores [b, n_items]; rows, cols [P] the (row, item) pairs of every row's history. A pair listed
        twice (an item repeated in a history) adds once: training sees history as a set (a bitmap).
        """
        if self.history_bias is not None and rows.numel():
            scores[rows, cols] = scores[rows, cols] + self.history_bias.to(scores.dtype)  # [b, n_items]
        return scores

    def score_items(self, states: Tensor) -> Tensor:
        """Full-catalogue scores: states [b, H] -> [b, n_items] (higher = better)."""
        return torch.addmm(self.item_bias, states.to(self.item_out.dtype), self.item_out.t())  # [b, n_items]
