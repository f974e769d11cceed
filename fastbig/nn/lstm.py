"""Drop-in torch.nn.LSTM and torch.nn.LSTMCell on fastbig's fused ops.

LSTM is torch.nn.RNNBase("LSTM", ...) exactly as torch.nn.LSTM builds itself, with LSTM's own
argument checks; LSTMCell subclasses torch.nn.LSTMCell. So the constructor, the parameters,
the state_dict keys (weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0, weight_hr_l0,
*_reverse), flatten_parameters and the error messages are torch's own; only forward differs.
(LSTM is not a torch.nn.LSTM subclass on purpose: torch.compile refuses to trace any
isinstance(m, torch.nn.LSTM) module unless torch._dynamo.config.allow_rnn is set.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence

from .. import ops
from ..errors import DtypeError
from ..ops.lstm import lstm_cell_step_unchecked

__all__ = ["LSTM", "LSTMCell"]


class LSTM(torch.nn.RNNBase):
    """torch.nn.LSTM whose layers run fastbig.ops.lstm_layer (one fused op per layer and direction).

    Same constructor as torch.nn.LSTM: (input_size, hidden_size, num_layers=1, bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None).
    """

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)

    get_expected_cell_size = torch.nn.LSTM.get_expected_cell_size
    check_forward_args = torch.nn.LSTM.check_forward_args
    permute_hidden = torch.nn.LSTM.permute_hidden

    def _layer_weights(self, layer: int, direction: int):
        sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        w_ih = getattr(self, "weight_ih" + sfx)
        w_hh = getattr(self, "weight_hh" + sfx)
        b_ih = getattr(self, "bias_ih" + sfx) if self.bias else None
        b_hh = getattr(self, "bias_hh" + sfx) if self.bias else None
        w_hr = getattr(self, "weight_hr" + sfx) if self.proj_size > 0 else None
        return w_ih, w_hh, b_ih, b_hh, w_hr

    def forward(self, input, hx=None):  # noqa: C901 - mirrors torch.nn.LSTM.forward
        D = 2 if self.bidirectional else 1
        H = self.hidden_size
        P = self.proj_size if self.proj_size > 0 else H
        packed = isinstance(input, PackedSequence)
        unbatched = False
        if packed:
            x, batch_sizes, sorted_indices, unsorted_indices = input
            xin = x
            B = int(batch_sizes[0])
        else:
            batch_sizes = sorted_indices = unsorted_indices = None
            if not isinstance(input, torch.Tensor):
                raise TypeError(f"LSTM: input must be a Tensor or PackedSequence, got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D input instead")
            unbatched = input.dim() == 2
            xin = input.unsqueeze(0 if self.batch_first else 1) if unbatched else input
            x = xin.transpose(0, 1) if self.batch_first else xin
            B = x.shape[1]
            if x.shape[0] == 0:  # torch.nn.LSTM's own check and message (a RuntimeError)
                raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if hx is None:
            h0 = x.new_zeros(self.num_layers * D, B, P)
            c0 = x.new_zeros(self.num_layers * D, B, H)
        else:
            if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
                raise TypeError("LSTM: hx must be a tuple (h_0, c_0)")
            h0, c0 = hx
            want = 2 if unbatched else 3
            if h0.dim() != want or c0.dim() != want:
                kind = "unbatched 2-D" if unbatched else "batched 3-D"
                raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got "
                                   f"({h0.dim()}-D, {c0.dim()}-D) tensors")
            if unbatched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            if sorted_indices is not None:
                h0 = h0.index_select(1, sorted_indices)
                c0 = c0.index_select(1, sorted_indices)
        # torch's own checks and messages: dtype, input_size, hidden sizes.
        self.check_forward_args(xin, (h0, c0), batch_sizes)
        for name, t in (("h_0", h0), ("c_0", c0)):
            if t.dtype != x.dtype:
                raise DtypeError(f"LSTM: {name} has dtype {t.dtype} but input has {x.dtype}; expected one dtype")
            if t.device != x.device:
                raise RuntimeError(f"LSTM: {name} is on {t.device} but input is on {x.device}; "
                                   f"expected one device")

        layer_in = x
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outs = []
            for d in range(D):
                k = layer * D + d
                y, h, c = ops.lstm_layer(layer_in, h0[k], c0[k], *self._layer_weights(layer, d),
                                         batch_sizes=batch_sizes, reverse=d == 1)
                outs.append(y)
                h_n.append(h)
                c_n.append(c)
            layer_in = torch.cat(outs, dim=-1) if D == 2 else outs[0]
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_in = F.dropout(layer_in, p=self.dropout, training=True)
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)
        if packed:
            if unsorted_indices is not None:
                h_n = h_n.index_select(1, unsorted_indices)
                c_n = c_n.index_select(1, unsorted_indices)
            return PackedSequence(layer_in, batch_sizes, sorted_indices, unsorted_indices), (h_n, c_n)
        out = layer_in
        if unbatched:
            return out.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, (h_n, c_n)


class LSTMCell(torch.nn.LSTMCell):
    """torch.nn.LSTMCell: one fastbig.ops.lstm_cell_step per call (the GEMMs and the cell fused)."""

    def forward(self, input, hx=None):
        # A decoder calls this once per token: the common case (batched, hx given, everything
        # consistent) is recognized in one test; anything else takes the checks below, which
        # raise torch.nn's errors.
        w = self.weight_ih
        if isinstance(input, torch.Tensor) and isinstance(hx, tuple) and len(hx) == 2 and input.dim() == 2:
            h, c = hx
            want = (input.shape[0], self.hidden_size)
            if (isinstance(h, torch.Tensor) and isinstance(c, torch.Tensor) and input.shape[1] == self.input_size
                    and h.shape == want and c.shape == want
                    and input.dtype == h.dtype == c.dtype == w.dtype
                    and input.device == h.device == c.device == w.device):
                return lstm_cell_step_unchecked(input, h, c, w, self.weight_hh, self.bias_ih, self.bias_hh)
        return self._forward_checked(input, hx)

    def _forward_checked(self, input, hx):
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"LSTMCell: input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
                raise TypeError("LSTMCell: hx must be a tuple (h_0, c_0)")
            for i, t in enumerate(hx):
                if t.dim() not in (1, 2):  # torch's own check (a ValueError) ...
                    raise ValueError(f"LSTMCell: Expected hx[{i}] to be 1D or 2D, got {t.dim()}D instead")
                if t.dim() != input.dim():  # ... and torch's cell raises a RuntimeError for this one
                    raise RuntimeError(f"LSTMCell: Expected hx[{i}] to be {input.dim()}D (as the input), "
                                       f"got {t.dim()}D instead")
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        B = x.shape[0]
        if hx is None:
            h = x.new_zeros(B, self.hidden_size)
            c = x.new_zeros(B, self.hidden_size)
        else:
            h, c = hx if batched else (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        if x.shape[1] != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {x.shape[1]} expected {self.input_size}")
        for i, t in enumerate((h, c)):
            if t.shape[0] != B:
                raise RuntimeError(f"Input batch size {B} doesn't match hidden{i} batch size {t.shape[0]}")
            if t.shape[1] != self.hidden_size:
                raise RuntimeError(f"hidden{i} has inconsistent hidden_size: got {t.shape[1]}, "
                                   f"expected {self.hidden_size}")
        w = self.weight_ih
        for name, t in (("input", x), ("hx[0]", h), ("hx[1]", c)):
            if t.dtype != w.dtype:
                raise DtypeError(f"LSTMCell: {name} has dtype {t.dtype} but the weights have {w.dtype}")
            if t.device != w.device:
                raise RuntimeError(f"LSTMCell: {name} is on {t.device} but the weights are on {w.device}")
        h_new, c_new = lstm_cell_step_unchecked(x, h, c, self.weight_ih, self.weight_hh, self.bias_ih,
                                                self.bias_hh)
        if not batched:
            return h_new.squeeze(0), c_new.squeeze(0)
        return h_new, c_new
