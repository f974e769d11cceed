"""The LSTM ops, whole life in one file: registration (schemas in csrc/registration.cpp),
fake impls, autograd, input checks and dispatch to _C or the reference.

    lstm_cell_pointwise(gates, c_prev) -> (h, c)
                                            the cell's pointwise part, fused: activations and
                                            state update from pre-activation gates (schema
                                            fastbig::lstm_cell; old name ops.lstm_cell)
    lstm_cell_step(x, h, c, w_ih, w_hh, b_ih, b_hh) -> (h, c)
                                            one whole nn.LSTMCell step (GEMMs + cell) as one
                                            op and one autograd node; CPU float32: one OpenMP
                                            team per call, each thread its own single-threaded
                                            GEMMs and the cell of the units it owns; CUDA (and
                                            other CPU dtypes): ATen GEMMs + the fused cell kernels
    lstm_layer(x, h0, c0, w_ih, w_hh, ...) -> (y, h_n, c_n)
                                            one whole layer, one direction (schema
                                            fastbig::lstm_layer, csrc/lstm/lstm_layer.h; old name
                                            ops.lstm):
                                            input GEMM for all steps, per step one recurrent GEMM
                                            and one fused pointwise kernel; fused backward.
                                            CPU, float32, batch <= 64, no proj_size: the whole
                                            time loop (forward and backward) is one fused kernel
                                            (csrc/lstm/lstm_layer_cpu.cpp: W_hh packed once per call,
                                            GEMM + cell per 8 units, one barrier per step)
"""
from __future__ import annotations

import torch

from .. import backends
from .._extension import has_op
from ..reference import lstm as ref
from ._checks import check_same, check_shape, check_tensor

_OP = "lstm_cell"


def _refuse_double_backward(op, *tensors):
    """The fused backward kernels are not differentiable: under create_graph=True say so,
    rather than hand back a second derivative that is silently zero."""
    if (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)):
        raise RuntimeError(f"fastbig.{op}: double backward (create_graph=True, higher-order gradients) "
                           f"is not supported by the fused kernels; run it under "
                           f"fastbig.backends.use('reference')")

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
        ctx.set_materialize_grads(False)  # no [B, 4H] of zeros for act's gradient every step

    def _lstm_cell_backward(ctx, grad_h, grad_c, _grad_act):
        act, c_prev, c = ctx.saved_tensors
        _refuse_double_backward(_OP, grad_h, grad_c, act, c_prev, c)
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


def lstm_cell_pointwise(gates: torch.Tensor, c_prev: torch.Tensor):
    """The pointwise part of one LSTM step, fused: pre-activation gates [B, 4H] (i, f, g, o), the
    GEMMs already done, and c_prev [B, H] -> (h, c). (A whole nn.LSTMCell step, GEMMs included,
    is lstm_cell_step.)"""
    _check_cell(gates, c_prev)
    if backends.extension_backend(_OP, gates.device, "lstm_cell") == "reference":
        return ref.lstm_cell_pointwise(gates, c_prev)
    h, c, _ = torch.ops.fastbig.lstm_cell(gates, c_prev)
    return h, c


# ---- the whole-cell step (nn.LSTMCell) --------------------------------------------------------
_STEP = "lstm_cell_step"

if has_op(_STEP):

    @torch.library.register_fake("fastbig::lstm_cell_step")
    def _lstm_cell_step_fake(x, h, c, w_ih, w_hh, b_ih, b_hh):
        B, H = x.shape[0], w_ih.shape[0] // 4
        return x.new_empty(B, H), x.new_empty(B, H), x.new_empty(B, 4 * H)

    @torch.library.register_fake("fastbig::lstm_cell_step_backward")
    def _lstm_cell_step_backward_fake(grad_h, grad_c, x, h, c, w_ih, w_hh, c_new, act, need_input_grad,
                                      need_weight_grad):
        def out(shape, need):  # a gradient not asked for is empty (and aliases nothing)
            return x.new_empty(shape if need else (0,))
        return (out(x.shape, need_input_grad), h.new_empty(h.shape), c.new_empty(c.shape),
                out(w_ih.shape, need_weight_grad), out(w_hh.shape, need_weight_grad),
                out((w_ih.shape[0],), need_weight_grad))

    def _lstm_cell_step_setup(ctx, inputs, output):
        x, h, c, w_ih, w_hh, b_ih, b_hh = inputs
        _h_new, c_new, act = output
        ctx.has_b = (b_ih is not None, b_hh is not None)
        ctx.save_for_backward(x, h, c, w_ih, w_hh, c_new, act)
        ctx.mark_non_differentiable(act)
        ctx.set_materialize_grads(False)

    def _lstm_cell_step_backward(ctx, grad_h, grad_c, _grad_act):
        x, h, c, w_ih, w_hh, c_new, act = ctx.saved_tensors
        _refuse_double_backward(_STEP, grad_h, grad_c, x, h, c, w_ih, w_hh)
        if grad_h is None and grad_c is None:
            return (None,) * 7
        need = ctx.needs_input_grad
        need_w = any(need[3:])
        dx, dh, dc, dw_ih, dw_hh, db = torch.ops.fastbig.lstm_cell_step_backward(
            grad_h, grad_c, x, h, c, w_ih, w_hh, c_new, act, need[0], need_w)
        return (dx if need[0] else None, dh, dc, dw_ih if need_w else None, dw_hh if need_w else None,
                db if need_w and ctx.has_b[0] else None, db if need_w and ctx.has_b[1] else None)

    torch.library.register_autograd("fastbig::lstm_cell_step", _lstm_cell_step_backward,
                                    setup_context=_lstm_cell_step_setup)


def _check_w_ih(op, w_ih):
    """w_ih [4H, I] -> (H, I)."""
    check_tensor(op, "w_ih", w_ih, dim=2)
    if w_ih.shape[0] % 4 != 0 or w_ih.shape[0] == 0:
        raise ValueError(f"{op}: w_ih must be [4*hidden_size, input_size], got {tuple(w_ih.shape)}")
    return w_ih.shape[0] // 4, w_ih.shape[1]


def _check_state_and_weights(op, B, H, P, h_name, h, c_name, c, w_hh, b_ih, b_hh):
    """h [B, P], c [B, H], w_hh [4H, P], biases [4H] or None."""
    check_tensor(op, h_name, h, dim=2)
    check_tensor(op, c_name, c, dim=2)
    check_shape(op, h_name, h, (B, P))
    check_shape(op, c_name, c, (B, H))
    check_tensor(op, "w_hh", w_hh, dim=2)
    check_shape(op, "w_hh", w_hh, (4 * H, P))
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None:
            check_tensor(op, name, b, dim=1)
            check_shape(op, name, b, (4 * H,))


def _check_cell_step(x, h, c, w_ih, w_hh, b_ih, b_hh):
    H, I = _check_w_ih(_STEP, w_ih)
    check_tensor(_STEP, "x", x, dim=2)
    if x.shape[1] != I:
        raise RuntimeError(f"{_STEP}: input has inconsistent input_size: got {x.shape[1]} expected {I}")
    _check_state_and_weights(_STEP, x.shape[0], H, H, "h", h, "c", c, w_hh, b_ih, b_hh)
    check_same(_STEP, "x", x, h=h, c=c, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)


_STEP_CPU_OK = has_op(_STEP) and backends.extension_available("cpu")[0]


def _step_backend(device) -> str:
    if device.type == "cpu" and _STEP_CPU_OK and backends.current() == "auto":
        return "cpu"  # the per-token path of a decoder: no dict, no resolve
    return backends.extension_backend(_STEP, device, _STEP)


def lstm_cell_step(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None):
    """One nn.LSTMCell step: x [B, I], h and c [B, H], w_ih [4H, I], w_hh [4H, H], biases [4H]
    or None -> (h', c'), torch.nn gate order (i, f, g, o)."""
    _check_cell_step(x, h, c, w_ih, w_hh, b_ih, b_hh)
    return lstm_cell_step_unchecked(x, h, c, w_ih, w_hh, b_ih, b_hh)


def lstm_cell_step_unchecked(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None):
    """lstm_cell_step for a caller that has checked the arguments itself (fastbig.nn.LSTMCell,
    which raises torch.nn's errors): a decoder calls it once per token, where the Python checks
    were a third of a batch-1 step. The C++ op still checks shapes, dtypes and devices."""
    if _step_backend(x.device) == "reference":
        return ref.lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh)
    h_new, c_new, _ = torch.ops.fastbig.lstm_cell_step(x, h, c, w_ih, w_hh, b_ih, b_hh)
    return h_new, c_new


# ---- the whole-layer op ----------------------------------------------------------------------
_LAYER = "lstm"

if has_op("lstm_layer"):

    @torch.library.register_fake("fastbig::lstm_layer")
    def _lstm_layer_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse):
        N, H, B = x.shape[0], w_ih.shape[0] // 4, h0.shape[0]
        P = w_hr.shape[0] if w_hr is not None else H
        hraw = x.new_empty(N, H) if w_hr is not None else x.new_empty(0)
        return (x.new_empty(N, P), x.new_empty(B, P), x.new_empty(B, H), x.new_empty(N, 4 * H),
                x.new_empty(N, H), hraw)

    @torch.library.register_fake("fastbig::lstm_layer_backward")
    def _lstm_layer_backward_fake(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr, batch_sizes,
                                  reverse, y, act, c_all, hraw):
        dw_hr = w_hr.new_empty(w_hr.shape) if w_hr is not None else x.new_empty(0)
        return (x.new_empty(x.shape), h0.new_empty(h0.shape), c0.new_empty(c0.shape),
                w_ih.new_empty(w_ih.shape), w_hh.new_empty(w_hh.shape), x.new_empty(w_ih.shape[0]), dw_hr)

    def _lstm_layer_setup(ctx, inputs, output):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse = inputs
        y, _h_n, _c_n, act, c_all, hraw = output
        ctx.reverse = reverse
        ctx.has_b = (b_ih is not None, b_hh is not None)
        ctx.has_proj = w_hr is not None
        ctx.has_bs = batch_sizes is not None
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, w_hr, batch_sizes, y, act, c_all, hraw)
        ctx.mark_non_differentiable(act, c_all, hraw)
        # Undefined gradients stay None (the kernel takes them as absent): materialized, they
        # were zero-filled [N, 4H] + [N, H] buffers for act/c_all, 5x the layer's output.
        ctx.set_materialize_grads(False)

    def _lstm_layer_backward(ctx, grad_y, grad_h_n, grad_c_n, _g_act, _g_c_all, _g_hraw):
        x, h0, c0, w_ih, w_hh, w_hr, batch_sizes, y, act, c_all, hraw = ctx.saved_tensors
        _refuse_double_backward(_LAYER, grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr)
        if grad_y is None and grad_h_n is None and grad_c_n is None:
            return (None,) * 10
        dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = torch.ops.fastbig.lstm_layer_backward(
            grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr if ctx.has_proj else None,
            batch_sizes if ctx.has_bs else None, ctx.reverse, y, act, c_all, hraw)
        return (dx, dh0, dc0, dw_ih, dw_hh, db if ctx.has_b[0] else None, db if ctx.has_b[1] else None,
                dw_hr if ctx.has_proj else None, None, None)

    torch.library.register_autograd("fastbig::lstm_layer", _lstm_layer_backward,
                                    setup_context=_lstm_layer_setup)


def _check_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes):
    H, I = _check_w_ih(_LAYER, w_ih)
    if w_hr is not None:
        check_tensor(_LAYER, "w_hr", w_hr, dim=2)
        if not (0 < w_hr.shape[0] < H) or w_hr.shape[1] != H:
            raise ValueError(f"{_LAYER}: w_hr must be [proj_size, {H}] with 0 < proj_size < {H}, "
                             f"got {tuple(w_hr.shape)}")
    P = w_hr.shape[0] if w_hr is not None else H
    if batch_sizes is None:
        check_tensor(_LAYER, "x", x, dim=3)
        if x.shape[0] == 0:
            raise ValueError(f"{_LAYER}: x must be non-empty in time, [T > 0, B, input_size], "
                             f"got {tuple(x.shape)}")
    else:
        check_tensor(_LAYER, "x", x, dim=2)
        if not isinstance(batch_sizes, torch.Tensor) or batch_sizes.dim() != 1:
            raise TypeError(f"{_LAYER}: batch_sizes must be a 1-D int64 tensor, got {batch_sizes!r}")
        if batch_sizes.dtype != torch.int64 or batch_sizes.device.type != "cpu":
            raise TypeError(f"{_LAYER}: batch_sizes must be an int64 CPU tensor (as PackedSequence "
                            f"keeps it), got {batch_sizes.dtype} on {batch_sizes.device}")
    if x.shape[-1] != I:
        raise RuntimeError(f"{_LAYER}: input.size(-1) must be equal to input_size. Expected {I}, "
                           f"got {x.shape[-1]}")
    check_tensor(_LAYER, "h0", h0, dim=2)
    B = x.shape[1] if batch_sizes is None else h0.shape[0]
    _check_state_and_weights(_LAYER, B, H, P, "h0", h0, "c0", c0, w_hh, b_ih, b_hh)
    check_same(_LAYER, "x", x, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, w_hr=w_hr)
    if batch_sizes is not None and not torch.compiler.is_compiling():
        bs = batch_sizes.tolist()
        if (len(bs) == 0 or bs[0] != B or any(b <= 0 for b in bs)
                or any(b1 > b0 for b0, b1 in zip(bs, bs[1:])) or sum(bs) != x.shape[0]):
            raise ValueError(f"{_LAYER}: batch_sizes must be positive, non-increasing, start at "
                             f"B={B} and sum to x.size(0)={x.shape[0]}; got {bs}")


def lstm_layer(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, *, batch_sizes=None, reverse=False):
    """One LSTM layer, one direction, torch.nn gate order (i, f, g, o).

    x: [T, B, I] time-major, or a PackedSequence's data [N, I] with its ``batch_sizes`` (int64
    CPU, non-increasing: step t holds the first batch_sizes[t] rows; a row outside a step keeps
    its h and c, so each sequence stops at its own length). h0 [B, P], c0 [B, H]; w_ih [4H, I],
    w_hh [4H, P], biases [4H] or None, w_hr [P, H] (proj_size) or None. reverse runs the steps
    backwards (the reverse direction of a bidirectional layer).
    Returns y ([T, B, P] or [N, P]), h_n [B, P], c_n [B, H] (each row's last valid step).
    """
    _check_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes)
    unpacked = batch_sizes is None
    x2 = x.reshape(x.shape[0] * x.shape[1], x.shape[2]) if unpacked else x
    if unpacked and x.shape[1] == 0:
        # An empty batch: nothing to compute; empty outputs as torch.nn.LSTM gives, linked to x,
        # h0, c0 and the weights so that backward runs and gives each its gradient as torch does:
        # empty for the inputs, zeros for the weights (not None: optimizers treat those alike).
        link = x.sum()
        for t in (w_ih, w_hh, b_ih, b_hh, w_hr):
            if t is not None:
                link = link + t.sum()
        y = x.new_zeros(x.shape[0], 0, w_hh.shape[1]) + link
        return y, h0 + link, c0 + link
    if backends.extension_backend(_LAYER, x.device, "lstm_layer") == "reference":
        y, h_n, c_n = ref.lstm_layer(x2, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes=batch_sizes,
                                     reverse=bool(reverse))
    else:
        y, h_n, c_n, _, _, _ = torch.ops.fastbig.lstm_layer(x2, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                                                            batch_sizes, bool(reverse))
    if unpacked:
        y = y.view(x.shape[0], x.shape[1], y.shape[1])
    return y, h_n, c_n


# The old names, kept for code that has them: lstm_cell was easily taken for nn.LSTMCell's op
# (that is lstm_cell_step), and lstm for the whole multi-layer nn.LSTM.
lstm_cell = lstm_cell_pointwise
lstm = lstm_layer
