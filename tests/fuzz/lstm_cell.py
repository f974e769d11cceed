"""Fuzz cases of the LSTM cell ops: ``lstm_cell`` (the pointwise gates -> (h, c)) and
``lstm_cell_step`` (a whole nn.LSTMCell step: both GEMMs and the pointwise part)."""
from __future__ import annotations

import math
import random
from typing import List

import torch

import fastbig
from fastbig import backends
from conftest import tol

from ._common import (LAYOUTS, Check, _check_meta, _condition, _grads, _leaf, _tensor, _unchanged,
                      attention_grad_bound)
from ._registry import OpSpec, register


# ---- lstm_cell -------------------------------------------------------------------------------
def _cell_output_grads(gen, B, H, dtype, which):
    """(dh, dc) for a cell's (h, c): both, or only one ("h" / "c"; the other None)."""
    dh = torch.randn(B, H, generator=gen, dtype=torch.float64).to(dtype)
    dc = torch.randn(B, H, generator=gen, dtype=torch.float64).to(dtype)
    return (dh, None) if which == "h" else (None, dc) if which == "c" else (dh, dc)


def _lstm_cell_gen(r: random.Random) -> dict:
    p = dict(
        B=r.choice([1, 2, 3, 5, 8, r.randint(1, 40)]),
        H=r.choice([1, 2, 7, 16, 53, r.randint(1, 64)]),
        dtype=r.choice(["float32", "float32", "float64", "float16", "bfloat16"]),
        scale=r.choice([0.5, 1.0, 3.0, 10.0]),
        layout_g=r.choice(LAYOUTS), layout_c=r.choice(LAYOUTS),
        backend=r.choice(["auto", "cpu", "cpu", "reference"]),
        grads=r.choice(["both", "both", "h", "c"]),
    )
    _condition(p, ("B", "H"), p["layout_g"] == "expanded" or p["layout_c"] == "expanded")
    return p


def _lstm_cell_run(p: dict, seed: int) -> List[Check]:
    from fastbig.reference.lstm import lstm_cell_pointwise
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, p["dtype"])
    B, H = p["B"], p["H"]
    g0, gview = _tensor(gen, (B, 4 * H), dtype, p["scale"], p["layout_g"])
    c0, cview = _tensor(gen, (B, H), dtype, 1.0, p["layout_c"])
    dh, dc = _cell_output_grads(gen, B, H, dtype, p["grads"])
    g, c = _leaf(g0), _leaf(c0)
    gi, ci = gview(g), cview(c)
    before = [gi.detach().clone(), ci.detach().clone()]
    with backends.use(p["backend"]):
        h, cn = fastbig.ops.lstm_cell(gi, ci)
    _unchanged("lstm_cell", before, [gi, ci])
    _check_meta("h", h, dtype, (B, H))
    _check_meta("c", cn, dtype, (B, H))
    g64, c64 = _leaf(g0, torch.float64), _leaf(c0, torch.float64)
    g64i, c64i = gview(g64), cview(c64)
    h_ref, c_ref = lstm_cell_pointwise(g64i, c64i)
    # gradients with respect to the op's own inputs (the views), so an expanded input's
    # gradient is the kernel's, not autograd's sum over the broadcast dim
    gg, gc = _grads([h if dh is not None else None, cn if dc is not None else None], [gi, ci], [dh, dc])
    rg, rc = _grads([h_ref if dh is not None else None, c_ref if dc is not None else None],
                    [g64i, c64i], [None if dh is None else dh.double(), None if dc is None else dc.double()])
    return [("h", h, h_ref, dtype, False), ("c", cn, c_ref, dtype, False),
            ("grad gates", gg, rg, dtype, False), ("grad c_prev", gc, rc, dtype, False)]


register(OpSpec("lstm_cell", _lstm_cell_gen, _lstm_cell_run, 1000))


# ---- lstm_cell_step (a whole nn.LSTMCell step) ---------------------------------------------------
def _lstm_cell_step_gen(r: random.Random) -> dict:
    big = r.random() < 0.25  # big enough for the fused CPU kernel to split units between threads
    p = dict(
        B=r.choice([1, 2, 3, 8, r.randint(1, 70)]) if not big else r.randint(4, 24),
        I=r.choice([1, 3, 16, 53, r.randint(1, 300)]) if not big else r.randint(64, 200),
        H=r.choice([1, 7, 16, 53, r.randint(1, 300)]) if not big else r.randint(128, 260),
        dtype=r.choice(["float32", "float32", "float32", "float64", "float16", "bfloat16"]),
        scale=r.choice([0.5, 1.0, 3.0]),
        bias=r.choice(["both", "both", "ih", "hh", "none"]),
        layout_x=r.choice(LAYOUTS), layout_h=r.choice(LAYOUTS), layout_c=r.choice(LAYOUTS),
        backend=r.choice(["auto", "cpu", "cpu", "reference"]),
        grads=r.choice(["both", "both", "h", "c"]),
        frozen=r.choice(["none", "none", "input", "weights"]),
        threads=r.choice([1, 2, 3]) if big else 1,
    )
    expanded = "expanded" in (p["layout_x"], p["layout_h"], p["layout_c"])
    _condition(p, ("B", "H"), expanded)
    _condition(p, ("B", "I"), expanded)  # grad input [B, I] too: not one or two elements in fp16/bf16
    return p


def _lstm_cell_step_run(p: dict, seed: int) -> List[Check]:
    from fastbig.reference.lstm import lstm_cell as ref_cell
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, p["dtype"])
    B, I, H = p["B"], p["I"], p["H"]
    x0, xview = _tensor(gen, (B, I), dtype, p["scale"], p["layout_x"])
    h0, hview = _tensor(gen, (B, H), dtype, 0.5, p["layout_h"])
    c0, cview = _tensor(gen, (B, H), dtype, 0.5, p["layout_c"])
    # pre-activations of about the input's scale (x W_ih^T with unit-variance rows of W / sqrt(fan))
    ws = [torch.randn(*shape, generator=gen, dtype=torch.float64) / math.sqrt(fan)
          for shape, fan in (((4 * H, I), I), ((4 * H, H), H))]
    bs = [torch.randn(4 * H, generator=gen, dtype=torch.float64) * 0.3 if on else None
          for on in (p["bias"] in ("both", "ih"), p["bias"] in ("both", "hh"))]
    dh, dc = _cell_output_grads(gen, B, H, dtype, p["grads"])
    names = ["input", "hx", "cx", "w_ih", "w_hh", "b_ih", "b_hh"]
    views = [xview, hview, cview] + [lambda t: t] * 4

    def leaves(dt):
        out = [_leaf(t, dt) for t in (x0, h0, c0)] + [None if t is None else _leaf(t, dt) for t in ws + bs]
        if p["frozen"] == "input":
            out[0].requires_grad_(False)
        elif p["frozen"] == "weights":
            for t in out[3:]:
                if t is not None:
                    t.requires_grad_(False)
        return out

    lv = leaves(dtype)
    args = [None if t is None else v(t) for t, v in zip(lv, views)]
    before = [a.detach().clone() for a in args if a is not None]
    n_threads = torch.get_num_threads()
    torch.set_num_threads(p["threads"])
    try:
        with backends.use(p["backend"]):
            h, c = fastbig.ops.lstm_cell_step(*args)
        _unchanged("lstm_cell_step", before, [a for a in args if a is not None])
        _check_meta("h", h, dtype, (B, H))
        _check_meta("c", c, dtype, (B, H))
        want = [i for i, a in enumerate(args) if a is not None and a.requires_grad]
        g = _grads([h if dh is not None else None, c if dc is not None else None], [args[i] for i in want],
                   [dh, dc])
    finally:
        torch.set_num_threads(n_threads)
    lv64 = leaves(torch.float64)
    args64 = [None if t is None else v(t) for t, v in zip(lv64, views)]
    h_ref, c_ref = ref_cell(*args64)
    gouts64 = [None if dh is None else dh.double(), None if dc is None else dc.double()]
    g64 = _grads([h_ref if dh is not None else None, c_ref if dc is not None else None], [args64[i] for i in want],
                 gouts64)
    checks = [("h", h, h_ref, dtype, False), ("c", c, c_ref, dtype, False)]
    floors = _cell_step_floors(args64, h_ref, c_ref, gouts64)
    for i, a, r in zip(want, g, g64):
        name = f"grad {names[i]}"
        if i in floors and r is not None and a is not None:
            # grad input / grad hx = dG W: a 4H-term sum per element that may cancel; bounded
            # by the terms' size as attention's dq is (cancellation_floors)
            bound = attention_grad_bound(floors[i], dtype, 4 * H)
            rn = r.norm().item()
            if tol(dtype) * rn < bound:
                checks.append((f"{name} (||ref|| {rn:.1e}, cancellation floor {floors[i]:.1e}: bound "
                               f"{bound:.1e} absolute)", (a.double() - r) * (tol(dtype) / bound),
                               torch.zeros_like(r), dtype, False))
                continue
        checks.append((name, a, r, dtype, False))
    return checks


def _cell_step_floors(args64, h_ref, c_ref, gouts64):
    """{0: floor of grad input, 1: floor of grad hx}: the root-sum-square size of the terms of
    dx = dG W_ih and dh = dG W_hh (dG the float64 gradient of the gates), sqrt(sum (dG^2 W^2)), for
    attention_grad_bound: dG is rounded to the input dtype before the GEMM (independent roundings
    of the terms add in root-sum-square), and the GEMM adds 4H products in fp32. With terms of
    random sign this is about ||ref||, so the normwise bound stays the larger; it decides only
    where the sum cancels (found: seed 87402125749, float32 B 1 I 1 H 16, a single dx element
    1.007e-5 off against the 1e-5 bound, the reference backend's own torch ops included)."""
    from fastbig.reference.lstm import lstm_cell_pointwise
    x, h, c, w_ih, w_hh, b_ih, b_hh = [None if t is None else t.detach() for t in args64]
    gates = x @ w_ih.t() + h @ w_hh.t()
    for b in (b_ih, b_hh):
        if b is not None:
            gates = gates + b
    gates.requires_grad_(True)
    hr, cr = lstm_cell_pointwise(gates, c)
    pairs = [(o, g) for o, g in zip((hr, cr), gouts64) if g is not None]
    dG2 = torch.autograd.grad([o for o, _ in pairs], gates, [g for _, g in pairs])[0].square()
    return {0: (dG2 @ w_ih.square()).sum().sqrt().item(), 1: (dG2 @ w_hh.square()).sum().sqrt().item()}


register(OpSpec("lstm_cell_step", _lstm_cell_step_gen, _lstm_cell_step_run, 400))
