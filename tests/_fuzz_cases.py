"""Seeded random cases for every fastbig op, shared by tests/test_fuzz.py and long runs.

A case is drawn from ``random.Random(seed)`` (shapes, dtypes, flags, memory layout, backend) and its
tensors from ``torch.Generator().manual_seed(seed)``; so ``(op, seed)`` replays it exactly:

    python tests/_fuzz_cases.py attention 1234         # prints the parameters and every error

Each runner runs fastbig's op forward AND backward on the case's inputs and the float64 oracle of
fastbig/reference/ on the same inputs (cast to float64), and returns the comparisons
``(name, out, ref, dtype, tf32)``; the test bounds each by tests/conftest.py's ``tol``.
Ops whose code has not landed (or that this build lacks) report why through ``available``.
"""
from __future__ import annotations

import math
import os
import random
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.append(os.path.dirname(_HERE))  # the checkout, when run as a script and not installed
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastbig  # noqa: E402
from fastbig import backends  # noqa: E402
from conftest import rel_err, tol  # noqa: E402

Check = Tuple[str, torch.Tensor, torch.Tensor, torch.dtype, bool]


@dataclass
class OpSpec:
    name: str
    available: Callable[[], Tuple[bool, str]]
    gen: Callable[[random.Random], dict]
    run: Callable[[dict, int], List[Check]]
    default_count: int
    note: str = ""
    extra: Dict = field(default_factory=dict)


OPS: Dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    OPS[spec.name] = spec
    return spec


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


LOW_PRECISION = ("float16", "bfloat16")


def _condition(p: dict, size_keys, expanded=False, min_numel=64):
    """Keep a case's conditioning within what conftest's normwise bounds measure.

    The bounds are normwise; a saturated sigmoid/tanh (|x| >~ 8) has 1 - s lost once s is rounded
    to the dtype (torch's own backward has the same property), and on a handful of elements, or
    when every broadcast row shares the saturated value (expanded inputs), that one element
    decides the norm: the check would measure rounding luck, not the kernel. So float16/bfloat16
    cases get at least ``min_numel`` output elements and input scale <= 3, small float32 cases
    scale <= 3, and expanded inputs scale <= 1. Saturation itself is tested directly
    (tests/test_reliability.py, tests/test_lstm_cell.py).
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


# ---- lstm_cell -------------------------------------------------------------------------------
def _lstm_cell_available():
    return True, ""


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
    dh = torch.randn(B, H, generator=gen, dtype=torch.float64).to(dtype)
    dc = torch.randn(B, H, generator=gen, dtype=torch.float64).to(dtype)
    if p["grads"] == "h":
        dc = None
    elif p["grads"] == "c":
        dh = None
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


register(OpSpec("lstm_cell", _lstm_cell_available, _lstm_cell_gen, _lstm_cell_run, 1000))


# ---- attention (CPU fast path and the reference) ---------------------------------------------
def _attention_available():
    if not hasattr(fastbig.ops, "attention"):
        return False, "fastbig.ops.attention has not landed"
    return True, ""


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
    # Conditioning: dq and dk are proportional to p(1 - p); when a row's softmax is nearly
    # one-hot (large logits, or a row that may see only one or two keys: the first rows under
    # causal, a narrow window) they are roundoff over ~0 and a normwise bound measures luck.
    # So logits of std <= 1 (input scale <= 1) and, with causal/window, at least 8 rows/keys.
    p["input_scale"] = min(p["input_scale"], 1.0)
    if p["causal"] or p["window"] is not None:
        p["Sq"], p["Sk"] = max(p["Sq"], 8), max(p["Sk"], 8)
    if triton:  # the interpreter runs each program in Python: keep the grid small
        p["B"], p["Hkv"] = min(p["B"], 2), min(p["Hkv"], 2)
        p["Hq"] = p["Hkv"] * min(p["Hq"] // Hkv, 2)
    if p["backend"] == "reference" and p["dtype"] in LOW_PRECISION:
        # the reference computes in the input dtype (torch eager); its float16/bfloat16 error is
        # torch's, not a kernel's, and exceeds conftest's bounds on small cases (reported)
        p["backend"] = "cpu"
    return p


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
    with backends.use(p["backend"]):
        res = fastbig.ops.attention(qi, ki, vi, attn_mask=fmask, key_padding_mask=kpm, **kw)
    _unchanged("attention", before, [qi, ki, vi] + [m for m in (fmask, kpm) if m is not None])
    out, lse = res if p["return_lse"] else (res, None)
    _check_meta("out", out, dtype, (B, Hq, Sq, D))
    q64, k64, v64 = _leaf(q0, torch.float64), _leaf(k0, torch.float64), _leaf(v0, torch.float64)
    rmask = fmask if fmask is None or fmask.dtype == torch.bool else fmask.double()
    rres = ref.attention(qv(q64), kv(k64), vv(v64), attn_mask=rmask, key_padding_mask=kpm, **kw)
    rout, rlse = rres if p["return_lse"] else (rres, None)
    dq, dk, dv = _grads([out], [q, k, v], [do])
    rq, rk, rv = _grads([rout], [q64, k64, v64], [do.double()])
    tf32 = p["backend"] == "triton" and torch.cuda.is_available()
    checks = [("out", out, rout, dtype, tf32), ("grad q", dq, rq, dtype, tf32),
              ("grad k", dk, rk, dtype, tf32), ("grad v", dv, rv, dtype, tf32)]
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


register(OpSpec("attention", _attention_available, _attention_gen, _attention_run, 1000))


def _attention_triton_available():
    ok, why = _attention_available()
    if not ok:
        return ok, why
    if not torch.cuda.is_available() and not backends.triton_interpret():
        return False, "TRITON_INTERPRET=1 was not set before the kernels were defined"
    return True, ""


register(OpSpec("attention_triton", _attention_triton_available,
                lambda r: _attention_gen(r, triton=True), _attention_run, 40,
                note="Triton interpreter: ~0.3 s a case on CPU, so fewer cases by default"))


# ---- replay ----------------------------------------------------------------------------------
def case_params(op: str, seed: int) -> dict:
    return OPS[op].gen(random.Random(seed))


def run_case(op: str, seed: int):
    """Returns (params, [(name, err, bound)]); raises what the op raises."""
    p = case_params(op, seed)
    results = []
    for name, out, ref, dtype, tf32 in OPS[op].run(p, seed):
        if out is None and ref is None:
            continue
        if out is None or ref is None:
            results.append((name, float("inf"), tol(dtype, tf32=tf32)))
            continue
        results.append((name, rel_err(out, ref), tol(dtype, tf32=tf32)))
    return p, results


def seeds(op: str, count: int, base: int = 0):
    """The seeds of the first ``count`` cases of ``op`` (distinct per op)."""
    salt = sum(ord(ch) * 131 ** i for i, ch in enumerate(op)) % 1_000_003
    return [base * 10_000_019 + salt * 100_003 + i for i in range(count)]


if __name__ == "__main__":
    op, seed = sys.argv[1], int(sys.argv[2])
    p, res = run_case(op, seed)
    print(f"{op} seed={seed} params={p}")
    for name, err, bound in res:
        print(f"  {name}: rel err {err:.3e} (bound {bound:.1e}){'  FAIL' if not err <= bound else ''}")
