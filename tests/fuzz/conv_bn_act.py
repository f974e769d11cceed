"""Fuzz cases of ``conv_bn_act``: a convolution (or transposed convolution), BatchNorm in training
or eval mode, and an activation, fused."""
from __future__ import annotations

import math
import random
from typing import List

import torch

import fastbig
from fastbig import backends
from conftest import tol

from ._common import Check, _check_meta, _grads, _leaf, _tensor
from ._registry import OpSpec, register


def _conv_gen(r: random.Random) -> dict:
    groups = r.choice([1, 1, 1, 2, 3])
    p = dict(
        N=r.choice([1, 2, 3, 4]),
        Cin=groups * r.choice([1, 2, 3]),
        Cout=groups * r.choice([1, 2, 3, 4]),
        groups=groups,
        H=r.choice([1, 3, 5, 8, r.randint(1, 12)]),
        W=r.choice([1, 4, 7, r.randint(1, 12)]),
        k=r.choice([1, 3, 3, 2]),
        stride=r.choice([1, 1, 2]),
        padding=r.choice([0, 1, 1, 2]),
        dilation=r.choice([1, 1, 2]),
        transposed=r.random() < 0.25,
        conv_bias=r.random() < 0.3,
        affine=r.random() < 0.85,
        running=r.choice(["track", "track", "none"]),
        training=r.random() < 0.8,
        momentum=r.choice([0.1, 0.1, 0.5, None]),
        eps=r.choice([1e-5, 1e-3]),
        activation=r.choice(["relu", "relu", "leaky_relu", "none"]),
        negative_slope=r.choice([0.01, 0.2]),
        dtype=r.choice(["float32", "float32", "float64"]),
        layout=r.choice(["contiguous", "channels_last", "strided", "expanded"]),
        backend=r.choice(["auto", "cpu", "cpu", "reference"]),
    )
    # Conditioning. BatchNorm is invariant to the scale of each output channel's conv weights, so
    # a conv with a single weight per output channel has an exactly-zero weight gradient: give
    # each at least 4. Batch statistics over a handful of values (or over copies of one sample)
    # make x_hat a sign pattern with a ~0 gradient: at least 8 distinct values per channel (an
    # expanded input is broadcast along its channels, not its batch). An input smaller than the
    # dilated kernel leaves taps that only ever see padding (or the whole output constant).
    if (p["Cin"] // groups) * p["k"] ** 2 < 4:
        p["k"] = max(p["k"], 2)
    span = p["dilation"] * (p["k"] - 1) + 1
    p["H"], p["W"] = max(p["H"], span), max(p["W"], span)
    if p["transposed"]:
        p["output_padding"] = r.choice([0, 1]) if p["stride"] > 1 else 0
    if min(_conv_out(p)) < 1:
        p["padding"] = 0
    while min(_conv_out(p)) < 1:
        p["H"], p["W"] = p["H"] + 2, p["W"] + 2
    ho, wo = _conv_out(p)
    while p["N"] * ho * wo < 8:
        p["N"] += 1
    return p


def _conv_out(p):
    k, s, pad, d = p["k"], p["stride"], p["padding"], p["dilation"]
    if p["transposed"]:
        return tuple((n - 1) * s - 2 * pad + d * (k - 1) + p["output_padding"] + 1 for n in (p["H"], p["W"]))
    return tuple((n + 2 * pad - d * (k - 1) - 1) // s + 1 for n in (p["H"], p["W"]))


def _conv_run(p: dict, seed: int) -> List[Check]:
    from fastbig.reference import conv_bn_relu as ref
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, p["dtype"])
    N, Cin, Cout, g, k = p["N"], p["Cin"], p["Cout"], p["groups"], p["k"]
    layout = p["layout"]
    x0, xv = _tensor(gen, (N, Cin, p["H"], p["W"]), dtype, 1.0,
                     layout if layout in ("strided", "expanded") else "contiguous", expand_dim=1)
    if layout == "channels_last":
        xv = (lambda t: t.contiguous(memory_format=torch.channels_last))
    wshape = (Cin, Cout // g, k, k) if p["transposed"] else (Cout, Cin // g, k, k)
    w0, _ = _tensor(gen, wshape, dtype, 1.0 / math.sqrt(Cin * k * k / g))
    cb0, _ = _tensor(gen, (Cout,), dtype, 0.3)
    bw0 = (torch.rand(Cout, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    bb0, _ = _tensor(gen, (Cout,), dtype, 0.3)
    rm0, _ = _tensor(gen, (Cout,), dtype, 0.2)
    rv0 = (torch.rand(Cout, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    nbt0 = torch.tensor(int(torch.randint(0, 5, (), generator=gen)), dtype=torch.long)
    has = dict(cb=p["conv_bias"], aff=p["affine"], run=p["running"] == "track")
    leaves = [x0, w0] + ([cb0] if has["cb"] else []) + ([bw0, bb0] if has["aff"] else [])
    kw = dict(stride=p["stride"], padding=p["padding"], dilation=p["dilation"], groups=g,
              transposed=p["transposed"], output_padding=p.get("output_padding", 0),
              training=p["training"], momentum=p["momentum"], eps=p["eps"])

    def call(ls, fn, stats):
        it = iter(ls)
        x = xv(next(it))
        w = next(it)
        cb = next(it) if has["cb"] else None
        bw, bb = (next(it), next(it)) if has["aff"] else (None, None)
        return x, fn(x, w, cb, bw, bb, *stats)

    stats = (rm0.clone(), rv0.clone(), nbt0.clone()) if has["run"] else (None, None, None)
    lf = [_leaf(t) for t in leaves]
    x_in, _ = None, None
    with backends.use(p["backend"]):
        x_in, y = call(lf, lambda *a: fastbig.ops.conv_bn_act(
            *a, activation=p["activation"], negative_slope=p["negative_slope"], **kw), stats)
    exp = ref.conv(xv(x0).double(), w0.double(), None, p["stride"], p["padding"], p["dilation"], g,
                   p["transposed"], p.get("output_padding", 0)).shape
    _check_meta("y", y, dtype, exp)
    l64 = [_leaf(t, torch.float64) for t in leaves]
    stats64 = tuple(None if t is None else t.clone() if t.dtype == torch.long else t.clone().double()
                    for t in ((rm0, rv0, nbt0) if has["run"] else (None, None, None)))
    _, (ry, new) = call(l64, lambda *a: ref.conv_bn_act(
        *a, act=p["activation"], negative_slope=p["negative_slope"], **kw), stats64)
    # grad_y with a mean: the per-channel gradients of bn_weight/bn_bias are sums over the
    # channel, and a zero-mean grad_y makes a few of them cancel to ~0 by chance
    gy = torch.randn(*y.shape, generator=gen, dtype=torch.float64) + 1.0
    gr = _grads([y], lf, [gy.to(dtype)])
    rg = _grads([ry], l64, [gy])
    names = ["x", "conv_weight"] + (["conv_bias"] if has["cb"] else []) + (["bn_weight", "bn_bias"] if has["aff"] else [])
    checks = [("y", y, ry, dtype, False)]
    batch_stats = p["training"] or not has["run"]
    for n, a, b in zip(names, gr, rg):
        if n == "conv_bias" and batch_stats:
            # BatchNorm with batch statistics removes any per-channel constant: the exact gradient
            # of the conv bias is 0, so only its size relative to the others can be checked
            # (a sum over the n values of a channel: roundoff grows like sqrt(n))
            n_per_channel = y.numel() // y.shape[1]
            scale = max(t.norm().item() for t in rg if t is not None) * math.sqrt(n_per_channel)
            if a is not None and not a.detach().double().norm().item() <= tol(dtype) * scale:
                raise AssertionError(f"grad conv_bias: {a.norm().item():.3e}, exactly 0 in exact "
                                     f"arithmetic (batch statistics), over {tol(dtype):.0e} x {scale:.3e}")
            continue
        checks.append((f"grad {n}", a, b, dtype, False))
    if has["run"] and p["training"]:
        checks += [("running_mean", stats[0], new.running_mean, dtype, False),
                   ("running_var", stats[1], new.running_var, dtype, False)]
        if int(stats[2]) != int(new.num_batches_tracked):
            raise AssertionError(f"num_batches_tracked {int(stats[2])}, expected {int(new.num_batches_tracked)}")
    elif has["run"]:
        if not (torch.equal(stats[0], rm0) and torch.equal(stats[1], rv0) and torch.equal(stats[2], nbt0)):
            raise AssertionError("eval mode changed the running statistics")
    return checks


register(OpSpec("conv_bn_act", _conv_gen, _conv_run, 1000))
