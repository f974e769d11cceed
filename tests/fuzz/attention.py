"""Fuzz cases of ``attention``: the CPU fast path and the reference (``attention``), and the
Triton kernels, under the interpreter on a machine without a GPU (``attention_triton``)."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from typing import List

import torch

import fastbig
from fastbig import backends
from conftest import tol

from ._common import (LAYOUTS, LOW_PRECISION, Check, _check_meta, _grads, _leaf, _tensor, _unchanged,
                      attention_grad_bound)
from ._registry import OpSpec, register


def _attention_gen(r: random.Random, *, triton=False) -> dict:
    Hkv = r.choice([1, 1, 2, 3])
    p = dict(
        B=r.choice([1, 1, 2, 3]),
        Hkv=Hkv,
        Hq=Hkv * r.choice([1, 1, 2, 3]),
        Sq=r.choice([1, 2, 5, 16, 17, r.randint(1, 40)]),
        Sk=r.choice([1, 3, 16, 17, r.randint(1, 40)]),
        D=r.choice([16, 32, 64, 8, 24, r.randint(1, 64)]) if not triton else r.choice([16, 32, 24, 40, 64]),
        dtype=r.choice(["float32", "float32", "float64", "float16", "bfloat16"]) if not triton
        else r.choice(["float32", "float16"]),
        causal=r.random() < 0.3,
        window=None if r.random() < 0.7 else (r.choice([None, 0, 1, 4, 9]), r.choice([None, 0, 2, 7])),
        mask=r.choice(["none", "none", "bool", "float", "kpm", "bool+kpm"]),
        mask_shape=r.choice(["full", "bcast_b", "bcast_h", "2d"]),
        scale=None if r.random() < 0.7 else r.choice([0.05, 0.3, 1.0]),
        return_lse=r.random() < 0.3,
        layout=r.choice(LAYOUTS),
        backend=r.choice(["auto", "cpu", "reference"]) if not triton else "triton",
        input_scale=r.choice([0.5, 1.0, 2.0]),
    )
    # No cap on the logits' size (input scale up to 2: std up to 4) and no minimum number of
    # rows/keys under causal or a window (rows that see one or two keys): the nearly one-hot
    # softmax rows they give make dq and dk ill-conditioned, which _attention_run bounds by the
    # size of the terms they cancel from (cancellation_floors), not by luck.
    # float16/bfloat16: at least 64 query-side elements and head dim >= 4, as _condition does for
    # the other ops (the normwise bound on a handful of rounded numbers measures luck)
    if p["dtype"] in LOW_PRECISION:
        p["D"] = max(p["D"], 4)
        p["Sq"] = max(p["Sq"], math.ceil(64 / (p["B"] * p["Hq"] * p["D"])))
    if triton:
        _attention_triton_shape(r, p)
    if p["backend"] == "reference" and p["dtype"] in LOW_PRECISION:
        # the reference computes in the input dtype (torch eager); its float16/bfloat16 error is
        # torch's, not a kernel's, and exceeds conftest's bounds on small cases (reported)
        p["backend"] = "cpu"
    return p


def _attention_triton_shape(r: random.Random, p: dict) -> None:
    """Shapes for the Triton interpreter, which runs every program of the grid in Python: a case
    costs about 7 ms + 6 ms per program + 3 ms per (query tile, key tile) pair on 2 busy cores
    (fitted over 200 cases), so spend programs where the kernels branch. B <= 2, Hq <= 4, at most 4
    (batch, head) pairs, and 70% of cases one pair (the others test batch/head strides and GQA
    groups of 2). Tile sizes are drawn too, 16, 32 or 64 each way, square or not (the GPU
    autotuner's 128 x 64, 64 x 128, ...): 70% of the time smaller than the sequence when it can
    be, so that a quarter of the cases cross 2-3 key tiles (online-softmax rescaling, the
    window's tile skipping) and a fifth 2-3 query tiles (dK/dV's loop over query blocks)."""
    group = p["Hq"] // p["Hkv"]
    p["B"], p["Hkv"] = min(p["B"], 2), min(p["Hkv"], 2)
    p["Hq"] = p["Hkv"] * min(group, 2)
    if p["B"] * p["Hq"] > 4:
        p["B"] = 1
    if r.random() < 0.7:
        p["B"] = p["Hkv"] = p["Hq"] = 1
    for blk, n in (("block_m", p["Sq"]), ("block_n", p["Sk"])):
        smaller = [b for b in (16, 32) if b < n]
        p[blk] = r.choice(smaller) if smaller and r.random() < 0.7 else r.choice([16, 32, 64])


def _masks(p, gen):
    B, Hq, Sq, Sk = p["B"], p["Hq"], p["Sq"], p["Sk"]
    shape = {"full": (B, Hq, Sq, Sk), "bcast_b": (1, Hq, Sq, Sk), "bcast_h": (B, 1, Sq, Sk),
             "2d": (Sq, Sk)}[p["mask_shape"]]
    attn_mask = kpm = None
    if p["mask"] in ("bool", "bool+kpm"):
        attn_mask = torch.rand(*shape, generator=gen) > 0.3
    elif p["mask"] == "float":
        attn_mask = torch.randn(*shape, generator=gen, dtype=torch.float64)
        attn_mask = attn_mask.masked_fill(torch.rand(*shape, generator=gen) < 0.2, float("-inf"))
    if p["mask"] in ("kpm", "bool+kpm"):
        kpm = torch.rand(B, Sk, generator=gen) < 0.25
    return attn_mask, kpm


def cancellation_floors(q, k, out, dout, probs, scale=None):
    """The size of the terms dq and dk cancel from, for a bound that stays fair when they are
    ill-conditioned. float64 q [B, Hq, Sq, D], k [B, Hkv, Sk, D], the reference's out and softmax
    probs [B, Hq, Sq, Sk], dout; returns (floor_q, floor_k) as floats.

    dS = P * (dP - delta) with delta_i = sum_d O_id dO_id, dq = scale dS K, dk = scale dS^T Q. When a
    row's softmax is (nearly) one-hot, dP_ij - delta_i is (nearly) 0 and ||dq||, ||dk|| are what is
    left of a cancellation, far below its terms, so a rounding that is tiny against the terms is
    large against ||dq||. Every flash-attention backward (FA2, and fastbig's Triton kernel) forms
    delta from the output O as stored in the input dtype: rounding O_i to float16 moves delta_i by
    about u ||O_i * dO_i||_2 and so moves dq by about u scale ||O_i * dO_i|| (P K)_i, dk by
    u scale P^T (||O * dO|| Q); in float32 the fp32 sums of dP and delta (D products each, in a
    different order) differ by about sqrt(D) u_fp32 ||O_i * dO_i||. The floors are those sizes
    without u (root-sum-square over heads and batch: independent roundings add so):

        floor_q = scale ||s (P K)||,  floor_k = scale ||P^T (s Q)||,  s_i = ||O_i * dO_i||_2

    and ``attention_grad_bound`` turns them into the bound. Found by replaying two float16 misses
    of a 1000-case Triton run: seed 35657270341 (causal + window (1, None) + bool mask + key
    padding leave one row with two keys, every other row one: ||dq|| 0.037, floor 21) and seed
    35657270362 (scale 1.0 at D 24: rows 93% and 99% on one key). There the kernel's error is what
    a float64 computation with delta from the float16-rounded O gets (dq 2.71e-3 against 2.73e-3):
    its arithmetic is right, the normwise bound measured the cancellation.
    """
    B, Hq, Sq, D = q.shape
    group = Hq // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    ke = k.repeat_interleave(group, dim=1) if group > 1 else k
    s = (out * dout).norm(dim=-1, keepdim=True)  # [B, Hq, Sq, 1]
    floor_q = scale * (s * (probs @ ke)).norm().item()
    floor_k = scale * (probs.transpose(-1, -2) @ (s * q)).norm().item()
    return floor_q, floor_k


@contextlib.contextmanager
def _interpreter(p: dict):
    """Runs a Triton case's kernels (forward and backward) with its drawn tile sizes, and without
    the interpreter's integer-overflow sanitizer: that one turns every int32 add/mul of the index
    math into int64 casts and compares whose result only a device_assert reads, and the
    interpreter's device_assert returns at once unless its options say debug (triton 3.x), so it
    costs a third of the interpreter's time and checks nothing. Other cases: nothing changes."""
    if p.get("backend") != "triton" or torch.cuda.is_available():
        yield
        return
    from fastbig.kernels import attention as kern
    try:
        from triton.runtime.interpreter import interpreter_builder as builder
    except ImportError:  # another triton layout: leave the interpreter as it is
        builder = None
    opts = getattr(builder, "options", None)
    dead = (opts is not None and dataclasses.is_dataclass(opts) and not getattr(opts, "debug", True)
            and getattr(opts, "sanitize_overflow", False))
    if dead:
        builder.options = dataclasses.replace(opts, sanitize_overflow=False)
    try:
        with kern.interpreter_blocks(p.get("block_m", 32), p.get("block_n", 32)):
            yield
    finally:
        if dead:
            builder.options = opts


def _attention_run(p: dict, seed: int) -> List[Check]:
    from fastbig.reference import attention as ref
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, p["dtype"])
    B, Hq, Hkv, Sq, Sk, D = p["B"], p["Hq"], p["Hkv"], p["Sq"], p["Sk"], p["D"]
    q0, qv = _tensor(gen, (B, Hq, Sq, D), dtype, p["input_scale"], p["layout"])
    k0, kv = _tensor(gen, (B, Hkv, Sk, D), dtype, p["input_scale"], p["layout"])
    v0, vv = _tensor(gen, (B, Hkv, Sk, D), dtype, 1.0, p["layout"])
    attn_mask, kpm = _masks(p, gen)
    fmask = attn_mask
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        fmask = attn_mask.to(dtype)
    do = torch.randn(B, Hq, Sq, D, generator=gen, dtype=torch.float64).to(dtype)
    q, k, v = _leaf(q0), _leaf(k0), _leaf(v0)
    qi, ki, vi = qv(q), kv(k), vv(v)
    before = [t.detach().clone() for t in (qi, ki, vi)] + [m.clone() for m in (fmask, kpm) if m is not None]
    kw = dict(causal=p["causal"], window=p["window"], scale=p["scale"], return_lse=p["return_lse"])
    with backends.use(p["backend"]), _interpreter(p):
        res = fastbig.ops.attention(qi, ki, vi, attn_mask=fmask, key_padding_mask=kpm, **kw)
        dq, dk, dv = _grads([res[0] if p["return_lse"] else res], [q, k, v], [do])
    _unchanged("attention", before, [qi, ki, vi] + [m for m in (fmask, kpm) if m is not None])
    out, lse = res if p["return_lse"] else (res, None)
    _check_meta("out", out, dtype, (B, Hq, Sq, D))
    q64, k64, v64 = _leaf(q0, torch.float64), _leaf(k0, torch.float64), _leaf(v0, torch.float64)
    rmask = fmask if fmask is None or fmask.dtype == torch.bool else fmask.double()
    rres = ref.attention(qv(q64), kv(k64), vv(v64), attn_mask=rmask, key_padding_mask=kpm,
                         return_weights=True, **kw)
    rout, rlse, probs = rres if p["return_lse"] else (rres[0], None, rres[1])
    rq, rk, rv = _grads([rout], [q64, k64, v64], [do.double()])
    tf32 = p["backend"] == "triton" and torch.cuda.is_available()
    checks = [("out", out, rout, dtype, tf32)]
    floor_q, floor_k = cancellation_floors(qv(q64).detach(), kv(k64).detach(), rout.detach(),
                                           do.double(), probs.detach(), p["scale"])
    for name, g, r, floor in (("grad q", dq, rq, floor_q), ("grad k", dk, rk, floor_k)):
        rn = 0.0 if r is None else r.norm().item()
        bound = attention_grad_bound(floor, dtype, D, tf32)
        if g is None or r is None or (rn > 0 and tol(dtype, tf32=tf32) * rn >= bound):
            checks.append((name, g, r, dtype, tf32))
        elif bound > 0:
            # ill-conditioned (see cancellation_floors): ||error|| <= bound, as error / (bound / tol)
            checks.append((f"{name} (||ref|| {rn:.1e}, cancellation floor {floor:.1e}: bound "
                           f"{bound:.1e} absolute)", (g.double() - r) * (tol(dtype, tf32=tf32) / bound),
                           torch.zeros_like(r), dtype, tf32))
        else:
            # every row fully masked: grad v is 0 too and the gradients must be exactly 0
            checks.append((name + " (exactly 0)", g.double() / (rv.norm().item() or 1.0),
                           torch.zeros_like(r), dtype, tf32))
    checks.append(("grad v", dv, rv, dtype, tf32))
    if lse is not None:
        # the API promises float32 lse; float64 inputs may keep float64
        _check_meta("lse", lse, torch.float32 if dtype != torch.float64 else lse.dtype, (B, Hq, Sq))
        fin = torch.isfinite(rlse)
        if not torch.equal(torch.isfinite(lse), fin) or not torch.equal(torch.isneginf(lse), ~fin):
            raise AssertionError("lse: -inf pattern (fully masked rows) differs from the reference")
        # lse is float32 (float64 allowed for float64 inputs) computed from inputs of `dtype`:
        # bound it by the looser of the two dtypes' tolerances
        lse_dt = dtype if dtype in (torch.float16, torch.bfloat16) else lse.dtype
        checks.append(("lse", lse[fin], rlse[fin], lse_dt, tf32))
    return checks


register(OpSpec("attention", _attention_gen, _attention_run, 1000))


def _attention_triton_available():
    if not torch.cuda.is_available() and not backends.triton_interpret():
        return False, "TRITON_INTERPRET=1 was not set before the kernels were defined"
    return True, ""


register(OpSpec("attention_triton", lambda r: _attention_gen(r, triton=True), _attention_run, 1000,
                available=_attention_triton_available,
                note="Triton interpreter: ~0.1 s a case on 2 busy CPU cores (see "
                     "_attention_triton_shape and _interpreter)"))
