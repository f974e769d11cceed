"""What the op modules share: the case type ``Check``, input layouts and tensor helpers, the
conditioning of a drawn case, and the error bound of a gradient that cancels."""
from __future__ import annotations

import math
from typing import Tuple

import torch

Check = Tuple[str, torch.Tensor, torch.Tensor, torch.dtype, bool]


# ---- tensor helpers --------------------------------------------------------------------------
LAYOUTS = ("contiguous", "transposed", "strided", "expanded")


def _tensor(gen, shape, dtype, scale=1.0, layout="contiguous", expand_dim=0):
    """(leaf, view) : leaf is what gradients land in; view(leaf-like) is the op's input.

    transposed: last two dims stored swapped (non-contiguous copy); strided: every other element
    of a wider buffer (a view); expanded: the leaf has size 1 at ``expand_dim`` and is broadcast
    (stride 0) to the full size.
    """
    shape = list(shape)
    leaf_shape = list(shape)
    if layout == "expanded":
        leaf_shape[expand_dim] = 1
    base = torch.randn(*leaf_shape, generator=gen, dtype=torch.float64) * scale
    leaf = base.to(dtype)

    def view(t):
        if layout == "transposed" and t.dim() >= 2:
            return t.transpose(-1, -2).contiguous().transpose(-1, -2)
        if layout == "strided":
            return torch.stack([t, t], dim=-1)[..., 0]
        if layout == "expanded":
            return t.expand(*shape)
        return t

    return leaf, view


def _leaf(t, dtype=None):
    t = t.detach().clone() if dtype is None else t.detach().to(dtype)
    return t.requires_grad_(True)


def _grads(outs, leaves, gouts):
    pairs = [(o, g) for o, g in zip(outs, gouts) if o is not None and o.requires_grad]
    if not pairs:
        return [None] * len(leaves)
    return list(torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs],
                                    allow_unused=True))


def _check_meta(name, out, dtype, shape):
    if out.dtype != dtype:
        raise AssertionError(f"{name}: dtype {out.dtype}, expected {dtype}")
    if tuple(out.shape) != tuple(shape):
        raise AssertionError(f"{name}: shape {tuple(out.shape)}, expected {tuple(shape)}")


def _unchanged(name, before, after):
    for i, (b, a) in enumerate(zip(before, after)):
        b, a = b.detach(), a.detach()
        same = torch.equal(b, a) or (b.is_floating_point() and a.shape == b.shape
                                     and torch.allclose(b, a, rtol=0, atol=0, equal_nan=True))
        if not same:
            raise AssertionError(f"{name}: input {i} was modified by the op")


# ---- conditioning ----------------------------------------------------------------------------
LOW_PRECISION = ("float16", "bfloat16")


def _condition(p: dict, size_keys, expanded=False, min_numel=64):
    """Keep a case's conditioning within what conftest's normwise bounds measure.

    The bounds are normwise; a saturated sigmoid/tanh (|x| >~ 8) has 1 - s lost once s is rounded
    to the dtype (torch's own backward has the same property), and on a handful of elements, or
    when every broadcast row shares the saturated value (expanded inputs), that one element
    decides the norm: the check would measure rounding luck, not the kernel. So float16/bfloat16
    cases get at least ``min_numel`` output elements and input scale <= 3, small float32 cases
    scale <= 3, and expanded inputs scale <= 1. Saturation itself is tested directly
    (tests/test_bad_input_*.py, tests/test_lstm_cell.py).
    """
    # an input expanded along size_keys[0] holds only the other sizes' worth of distinct values
    keys = size_keys[1:] if expanded else size_keys
    numel = 1
    for k in keys:
        numel *= p[k]
    if p["dtype"] in LOW_PRECISION and numel < min_numel:
        p[keys[-1]] = p[keys[-1]] * math.ceil(min_numel / numel)
        numel = min_numel
    if "scale" in p:
        if p["dtype"] in LOW_PRECISION or numel < min_numel:
            p["scale"] = min(p["scale"], 3.0)
        if expanded:
            p["scale"] = min(p["scale"], 1.0)


# ---- error bounds of cancelling gradients (attention's dq/dk, lstm_cell_step's dx/dh) ------------
# unit roundoff of each dtype (half an ulp at 1): the rounding of one stored number
UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
                 torch.bfloat16: 2.0 ** -8}


def attention_grad_bound(floor, dtype, head_dim, tf32=False):
    """The error a correct attention backward may make on dq (dk) from rounding the terms it
    cancels: 2 (u + sqrt(D) u_acc) x floor, u the input dtype's unit roundoff (the stored O), u_acc
    that of the fp32 accumulators (tf32's where the dots take tf32). The rounding is a random sum of
    about u/sqrt(3) x floor; 2u is 3.5 of its standard deviations. The tests take the larger of
    this and conftest's normwise tol(dtype) x ||ref||: for a softmax spread over several keys the
    floor is about ||ref|| and the normwise bound is the larger (fp16: tol = 4u), so only
    ill-conditioned cases change bound. The floors: attention.py's cancellation_floors, and
    lstm_cell.py's _cell_step_floors for the same kind of sum in an LSTM cell's backward."""
    u = UNIT_ROUNDOFF[dtype]
    u_acc = 2.0 ** -11 if tf32 else 2.0 ** -24
    if tf32:
        u = max(u, u_acc)
    return 2.0 * (u + math.sqrt(head_dim) * min(u_acc, u)) * floor
