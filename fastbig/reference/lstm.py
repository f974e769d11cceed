"""LSTM oracle in plain torch: torch.nn gate order (i, f, g, o), differentiable, exact in float64."""
from __future__ import annotations

import torch


def lstm_cell_pointwise(gates: torch.Tensor, c_prev: torch.Tensor):
    """One step from pre-activation gates [B, 4H] and c_prev [B, H] -> (h, c)."""
    i, f, g, o = gates.chunk(4, dim=-1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c = f * c_prev + i * g
    h = o * torch.tanh(c)
    return h, c


def lstm_cell(x, h_prev, c_prev, w_ih, w_hh, b_ih=None, b_hh=None):
    """nn.LSTMCell's math: gates = x W_ih^T + b_ih + h W_hh^T + b_hh."""
    gates = x @ w_ih.t() + h_prev @ w_hh.t()
    if b_ih is not None:
        gates = gates + b_ih
    if b_hh is not None:
        gates = gates + b_hh
    return lstm_cell_pointwise(gates, c_prev)
