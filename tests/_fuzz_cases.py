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

import contextlib
import dataclasses
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
def _cell_output_grads(gen, B, H, dtype, which):
    """(dh, dc) for a cell's (h, c): both, or only one ("h" / "c"; the other None)."""
    dh = torch.randn(B, H, generator=gen, dtype=torch.float64).to(dtype)
    dc = torch.randn(B, H, generator=gen, dtype=torch.float64).to(dtype)
    return (dh, None) if which == "h" else (None, dc) if which == "c" else (dh, dc)


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


register(OpSpec("lstm_cell", _lstm_cell_available, _lstm_cell_gen, _lstm_cell_run, 1000))


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


register(OpSpec("lstm_cell_step", _lstm_cell_available, _lstm_cell_step_gen, _lstm_cell_step_run, 400))


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


# unit roundoff of each dtype (half an ulp at 1): the rounding of one stored number
UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
                 torch.bfloat16: 2.0 ** -8}


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


def attention_grad_bound(floor, dtype, head_dim, tf32=False):
    """The error a correct attention backward may make on dq (dk) from rounding the terms it
    cancels: 2 (u + sqrt(D) u_acc) x floor, u the input dtype's unit roundoff (the stored O), u_acc
    that of the fp32 accumulators (tf32's where the dots take tf32). The rounding is a random sum of
    about u/sqrt(3) x floor; 2u is 3.5 of its standard deviations. The tests take the larger of
    this and conftest's normwise tol(dtype) x ||ref||: for a softmax spread over several keys the
    floor is about ||ref|| and the normwise bound is the larger (fp16: tol = 4u), so only
    ill-conditioned cases change bound."""
    u = UNIT_ROUNDOFF[dtype]
    u_acc = 2.0 ** -11 if tf32 else 2.0 ** -24
    if tf32:
        u = max(u, u_acc)
    return 2.0 * (u + math.sqrt(head_dim) * min(u_acc, u)) * floor


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


register(OpSpec("attention", _attention_available, _attention_gen, _attention_run, 1000))


def _attention_triton_available():
    ok, why = _attention_available()
    if not ok:
        return ok, why
    if not torch.cuda.is_available() and not backends.triton_interpret():
        return False, "TRITON_INTERPRET=1 was not set before the kernels were defined"
    return True, ""


register(OpSpec("attention_triton", _attention_triton_available,
                lambda r: _attention_gen(r, triton=True), _attention_run, 1000,
                note="Triton interpreter: ~0.1 s a case on 2 busy CPU cores (see "
                     "_attention_triton_shape and _interpreter)"))


# ---- lstm (whole layer, one direction) ---------------------------------------------------------
def _lstm_available():
    if not hasattr(fastbig.ops, "lstm"):
        return False, "fastbig.ops.lstm has not landed"
    return True, ""


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


register(OpSpec("lstm", _lstm_available, _lstm_gen, _lstm_run, 1000))


# ---- conv_bn_act -----------------------------------------------------------------------------
def _conv_available():
    if not hasattr(fastbig.ops, "conv_bn_act"):
        return False, "fastbig.ops.conv_bn_act has not landed"
    return True, ""


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


register(OpSpec("conv_bn_act", _conv_available, _conv_gen, _conv_run, 1000))


# ---- tiny modules and models (shared by test_state, test_compile_export, test_distributed) -----
def _g(seed):
    return torch.Generator().manual_seed(seed)


def module_cases():
    """name -> (make_fastbig(), make_torch_twin(), make_inputs(), forward kwargs). Twins have
    identical state_dict keys; fastbig.nn.MultiheadAttention runs its fused path only with
    need_weights=False."""
    from torch import nn
    from fastbig.models._layers import TorchSelfAttention
    fnn = fastbig.nn

    def x(*s, seed=0):
        return torch.randn(*s, generator=_g(seed))

    def seq(conv, act):
        return nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), *([act] if act else []))

    return {
        "MultiheadAttention": (lambda: fnn.MultiheadAttention(16, 2, batch_first=True),
                               lambda: nn.MultiheadAttention(16, 2, batch_first=True),
                               lambda: (x(2, 5, 16),) * 3, dict(need_weights=False)),
        "SelfAttention": (lambda: fnn.SelfAttention(16, causal=True), lambda: TorchSelfAttention(16, causal=True),
                          lambda: (x(2, 5, 16),), {}),
        "LSTM": (lambda: fnn.LSTM(5, 6, num_layers=2, bidirectional=True, batch_first=True),
                 lambda: nn.LSTM(5, 6, num_layers=2, bidirectional=True, batch_first=True),
                 lambda: (x(2, 7, 5),), {}),
        "LSTM_proj": (lambda: fnn.LSTM(5, 6, proj_size=3), lambda: nn.LSTM(5, 6, proj_size=3),
                      lambda: (x(7, 2, 5),), {}),
        "LSTMCell": (lambda: fnn.LSTMCell(5, 6), lambda: nn.LSTMCell(5, 6), lambda: (x(3, 5),), {}),
        "ConvBnReLU2d": (lambda: fnn.ConvBnReLU2d(3, 4, 3, padding=1),
                         lambda: seq(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU()),
                         lambda: (x(2, 3, 6, 6),), {}),
        "ConvBnLeakyReLU2d": (lambda: fnn.ConvBnLeakyReLU2d(3, 4, 3, padding=1, negative_slope=0.2),
                              lambda: seq(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.LeakyReLU(0.2)),
                              lambda: (x(2, 3, 6, 6),), {}),
        "ConvBn2d": (lambda: fnn.ConvBn2d(3, 4, 3, bias=True),
                     lambda: seq(nn.Conv2d(3, 4, 3, bias=True), None), lambda: (x(2, 3, 6, 6),), {}),
        "ConvTransposeBnReLU2d": (lambda: fnn.ConvTransposeBnReLU2d(3, 4, 3, stride=2, padding=1),
                                  lambda: seq(nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, bias=False),
                                              nn.ReLU()),
                                  lambda: (x(2, 3, 5, 5),), {}),
    }


def model_cases():
    """name -> (make(fused: bool), make_inputs()) at tiny sizes."""
    M = fastbig.models

    def x(*s, seed=0):
        return torch.randn(*s, generator=_g(seed))

    def ids(hi, *s, seed=0):
        return torch.randint(0, hi, s, generator=_g(seed))

    return {
        "SimpleCNN": (lambda f: M.SimpleCNN(3, 4, image_size=8, fused=f), lambda: (x(2, 3, 8, 8),)),
        "BigModel": (lambda f: M.BigModel(3, 4, image_size=8, hidden=16, fused=f), lambda: (x(2, 3, 8, 8),)),
        "MNISTNet": (lambda f: M.MNISTNet(image_size=8, hidden=16, fused=f), lambda: (x(2, 1, 8, 8),)),
        "MLP": (lambda f: M.MLP(12, (8, 8), 3, fused=f), lambda: (x(2, 12),)),
        "Autoencoder": (lambda f: M.Autoencoder(12, (8,), 4, fused=f), lambda: (x(2, 12),)),
        "WideDeep": (lambda f: M.WideDeep(4, (5, 5), 4, (8, 4), fused=f), lambda: (x(2, 4), ids(5, 2, 2))),
        "ResNet": (lambda f: M.ResNet((1, 1, 1, 1), width=4, num_classes=3, small_input=True, fused=f),
                   lambda: (x(2, 3, 8, 8),)),
        "LSTMClassifier": (lambda f: M.LSTMClassifier(5, 6, 2, 3, fused=f), lambda: (x(2, 7, 5),)),
        "SelfAttentionClassifier": (lambda f: M.SelfAttentionClassifier(5, embed_dim=8, num_classes=3,
                                                                        max_len=16, fused=f),
                                    lambda: (x(2, 7, 5),)),
        "Transformer": (lambda f: M.Transformer(11, d_model=16, nhead=2, num_encoder_layers=1,
                                                num_decoder_layers=1, dim_feedforward=16, max_len=16, fused=f),
                        lambda: (ids(11, 2, 6), ids(11, 2, 5, seed=1))),
        "BertEncoder": (lambda f: M.BertEncoder(20, 16, 1, 2, 16, max_position=16, dropout=0.0,
                                                num_classes=3, fused=f), lambda: (ids(20, 2, 6),)),
        "DCGAN": (lambda f: M.DCGAN(nz=4, ngf=8, ndf=8, image_size=8, fused=f), lambda: (x(3, 4),)),
    }


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
        if out is None or ref is None:  # autograd's None is a zero gradient (an unused input)
            out = torch.zeros_like(ref) if out is None else out
            ref = torch.zeros_like(out, dtype=torch.float64) if ref is None else ref
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
