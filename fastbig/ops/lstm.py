"""The LSTM ops, whole life in one file: registration (schemas in csrc/registration.cpp),
fake impls, autograd, input checks and dispatch to _C or the reference.

    lstm_cell(gates, c_prev) -> (h, c)      one fused pointwise step from pre-activation gates
"""
from __future__ import annotations

import torch

from .. import backends
from .._extension import has_op
from ..reference import lstm as ref
from ._checks import check_same, check_shape, check_tensor

_OP = "lstm_cell"

# ---- registration: fake impls and autograd for the C++ schemas ----------------------------
if has_op("lstm_cell"):

    @torch.library.register_fake("fastbig::lstm_cell")
    def _lstm_cell_fake(gates, c_prev):
        B, H4 = gates.shape
        H = H4 // 4
        return gates.new_empty(B, H), gates.new_empty(B, H), gates.new_empty(B, H4)

    @torch.library.register_fake("fastbig::lstm_cell_backward")
    def _lstm_cell_backward_fake(grad_h, grad_c, act, c_prev, c):
        return act.new_empty(act.shape), c_prev.new_empty(c_prev.shape)

    def _lstm_cell_setup(ctx, inputs, output):
        _, c_prev = inputs
        h, c, act = output
        ctx.save_for_backward(act, c_prev, c)
        ctx.mark_non_differentiable(act)

    def _lstm_cell_backward(ctx, grad_h, grad_c, _grad_act):
        act, c_prev, c = ctx.saved_tensors
        if grad_h is None and grad_c is None:
            return None, None
        grad_gates, grad_c_prev = torch.ops.fastbig.lstm_cell_backward(grad_h, grad_c, act, c_prev, c)
        return grad_gates, grad_c_prev

    torch.library.register_autograd("fastbig::lstm_cell", _lstm_cell_backward,
                                    setup_context=_lstm_cell_setup)


def _check_cell(gates, c_prev):
    check_tensor(_OP, "gates", gates, dim=2)
    check_tensor(_OP, "c_prev", c_prev, dim=2)
    if gates.shape[1] % 4 != 0:
        raise ValueError(f"{_OP}: gates must be [B, 4*H]; got size(1)={gates.shape[1]}, "
                         f"not a multiple of 4")
    check_same(_OP, "gates", gates, c_prev=c_prev)
    check_shape(_OP, "c_prev", c_prev, (gates.shape[0], gates.shape[1] // 4))


def _cell_backend(device) -> str:
    fast = {}
    if device.type == "cuda":
        fast["cuda"] = backends.extension_available(device) if has_op(_OP) else (False, "lstm_cell not built")
    elif device.type == "cpu":
        fast["cpu"] = backends.extension_available(device) if has_op(_OP) else (False, "lstm_cell not built")
    return backends.resolve(_OP, device, fast=fast)


def lstm_cell(gates: torch.Tensor, c_prev: torch.Tensor):
    """One fused LSTM step: pre-activation gates [B, 4H] (i, f, g, o) and c_prev [B, H] -> (h, c)."""
    _check_cell(gates, c_prev)
    if _cell_backend(gates.device) == "reference":
        return ref.lstm_cell_pointwise(gates, c_prev)
    h, c, _ = torch.ops.fastbig.lstm_cell(gates, c_prev)
    return h, c
