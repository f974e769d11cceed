"""Fuzz cases of ``lstm``: a whole LSTM layer in one direction (padded or packed, reversed or not,
with or without biases and a projection)."""
from __future__ import annotations

import math
import random
from typing import List

import torch

import fastbig
from fastbig import backends

from ._common import LAYOUTS, Check, _check_meta, _grads, _leaf, _tensor, _unchanged
from ._registry import OpSpec, register


def _lstm_gen(r: random.Random) -> dict:
    H = r.choice([1, 3, 8, 16, r.randint(1, 24)])
    p = dict(
        T=r.choice([1, 2, 5, r.randint(1, 12)]),
        B=r.choice([1, 2, 3, 5]),
        I=r.choice([1, 4, 7, 16]),
        H=H,
        P=0 if H < 2 or r.random() < 0.75 else r.randint(1, H - 1),
        bias=r.choice(["both", "both", "ih", "none"]),
        packed=r.random() < 0.3,
        reverse=r.random() < 0.3,
        dtype=r.choice(["float32", "float32", "float64"]),
        scale=r.choice([0.3, 0.5, 1.0]),
        layout=r.choice(LAYOUTS),
        backend=r.choice(["auto", "cpu", "cpu", "reference"]),
        grads=r.choice(["y", "all", "h_n", "c_n"]),
    )
    if p["packed"]:
        lens = sorted((r.randint(1, p["T"]) for _ in range(p["B"])), reverse=True)
        lens[0] = p["T"]
        p["lengths"] = lens
    return p


def _lstm_run(p: dict, seed: int) -> List[Check]:
    from fastbig.reference.lstm import lstm_layer
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, p["dtype"])
    T, B, I, H, P = p["T"], p["B"], p["I"], p["H"], p["P"]
    Pd = P or H
    k = p["scale"] / math.sqrt(H)
    if p["packed"]:
        bs = [sum(1 for L in p["lengths"] if L > t) for t in range(T)]
        N = sum(bs)
        batch_sizes = torch.tensor(bs, dtype=torch.int64)
        x0, xv = _tensor(gen, (N, I), dtype, 1.0, "contiguous" if p["layout"] == "expanded" else p["layout"])
    else:
        batch_sizes = None
        x0, xv = _tensor(gen, (T, B, I), dtype, 1.0, p["layout"], expand_dim=1)
    h00, hv = _tensor(gen, (B, Pd), dtype, 0.5)
    c00, cv = _tensor(gen, (B, H), dtype, 0.5)
    wih0, wihv = _tensor(gen, (4 * H, I), dtype, k, "transposed" if p["layout"] != "contiguous" else "contiguous")
    whh0, whhv = _tensor(gen, (4 * H, Pd), dtype, k)
    bih0, _ = _tensor(gen, (4 * H,), dtype, k)
    bhh0, _ = _tensor(gen, (4 * H,), dtype, k)
    whr0, _ = _tensor(gen, (max(P, 1), H), dtype, 1.0 / math.sqrt(H))
    use = dict(bih=p["bias"] in ("both", "ih"), bhh=p["bias"] == "both", whr=P > 0)
    leaves = [x0, h00, c00, wih0, whh0, bih0, bhh0, whr0]
    names = ["x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr"]
    views = [xv, hv, cv, wihv, whhv, None, None, None]
    on = [True, True, True, True, True, use["bih"], use["bhh"], use["whr"]]

    def args(ls):
        out = []
        for t, v, o in zip(ls, views, on):
            out.append((v(t) if v is not None else t) if o else None)
        return out

    lf = [_leaf(t) for t in leaves]
    a = args(lf)
    before = [t.detach().clone() for t in a if t is not None]
    with backends.use(p["backend"]):
        y, h_n, c_n = fastbig.ops.lstm(*a, batch_sizes=batch_sizes, reverse=p["reverse"])
    _unchanged("lstm", before, [t for t in a if t is not None])
    yshape = (batch_sizes.sum().item(), Pd) if p["packed"] else (T, B, Pd)
    _check_meta("y", y, dtype, yshape)
    _check_meta("h_n", h_n, dtype, (B, Pd))
    _check_meta("c_n", c_n, dtype, (B, H))
    l64 = [_leaf(t, torch.float64) for t in leaves]
    a64 = args(l64)
    x2 = a64[0] if p["packed"] else a64[0].reshape(T * B, I)
    ry, rh, rc = lstm_layer(x2, *a64[1:], batch_sizes=batch_sizes, reverse=p["reverse"])
    if not p["packed"]:
        ry = ry.view(T, B, Pd)
    gy = torch.randn(*y.shape, generator=gen, dtype=torch.float64)
    gh = torch.randn(*h_n.shape, generator=gen, dtype=torch.float64)
    gc = torch.randn(*c_n.shape, generator=gen, dtype=torch.float64)
    sel = {"y": (gy, None, None), "h_n": (None, gh, None), "c_n": (None, None, gc),
           "all": (gy, gh, gc)}[p["grads"]]
    outs = [o if g is not None else None for o, g in zip((y, h_n, c_n), sel)]
    routs = [o if g is not None else None for o, g in zip((ry, rh, rc), sel)]
    active = [i for i, o in enumerate(on) if o]
    g = _grads(outs, [lf[i] for i in active], [None if t is None else t.to(dtype) for t in sel])
    rg = _grads(routs, [l64[i] for i in active], list(sel))
    checks = [("y", y, ry, dtype, False), ("h_n", h_n, rh, dtype, False), ("c_n", c_n, rc, dtype, False)]
    for i, gi, ri in zip(active, g, rg):
        if gi is None and ri is not None and ri.abs().max() == 0:
            continue  # no path from the chosen outputs to this input: both zero/None
        checks.append((f"grad {names[i]}", gi, ri, dtype, False))
    return checks


register(OpSpec("lstm", _lstm_gen, _lstm_run, 1000))
