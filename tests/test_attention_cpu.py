"""fastbig's own CPU flash attention (csrc/attention, fastbig/ops/_attention_cpu.py) against the
float64 reference: every feature of SPEC.md, odd sizes, thread counts, both instruction-set builds,
NaN/inf and fully masked rows, the backward (dq, dk, dv, dsinks, dmask), opcheck, bad input.

The kernel runs through fastbig.ops.attention with the backend forced to ``cpu`` (which forces
this kernel wherever it takes the inputs) or through torch.ops.fastbig.attention_cpu_fwd directly.
"""
import math

import pytest
import torch

import fastbig
from conftest import assert_close, randn
from fastbig import backends
from fastbig.ops import _attention_cpu
from fastbig.ops.attention import _Features
from fastbig.reference import attention as ref

pytestmark = pytest.mark.skipif(not _attention_cpu.available(),
                                reason="fastbig._C has no attention_cpu op")


@pytest.fixture(params=["avx2", "baseline"])
def isa(request, monkeypatch):
    """Both builds of the kernel body: the one picked at load time and the baseline."""
    if request.param == "baseline":
        monkeypatch.setenv("FASTBIG_ATTN_ISA", "baseline")
    else:
        monkeypatch.delenv("FASTBIG_ATTN_ISA", raising=False)
    return request.param


@pytest.fixture
def threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, grad=True):
    return (randn(B, Hq, Sq, D, dtype=dtype, requires_grad=grad),
            randn(B, Hkv, Sk, D, dtype=dtype, requires_grad=grad),
            randn(B, Hkv, Sk, D, dtype=dtype, requires_grad=grad))


def _poison(*shapes):
    """Frees NaN-filled blocks of the outputs' sizes right before a call, so an output element the
    kernel forgets to write most likely reads NaN (glibc hands the freed chunk back)."""
    ts = [torch.full(s, float("nan")) for s in shapes]
    del ts


def _check(q, k, v, *, grad=True, factor=1.0, **kw):
    """ops.attention on the cpu backend vs the float64 reference: out, lse and every gradient."""
    B, Hq, Sq, D = q.shape
    _poison((B, Hq, Sq, D), (B, Hq, Sq))
    with backends.use("cpu"):
        out, lse = fastbig.ops.attention(q, k, v, return_lse=True, **kw)
    d = {n: (t.detach().double().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor)
             and t.is_floating_point() else t) for n, t in kw.items()}
    q64, k64, v64 = (t.detach().double().requires_grad_(grad) for t in (q, k, v))
    rout, rlse = ref.attention(q64, k64, v64, return_lse=True, **d)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close(out, rout, q.dtype, name="out", factor=factor)
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), fin), "lse: finite pattern differs from the reference"
    assert torch.equal(lse[~fin], rlse[~fin].float()), "lse: -inf rows differ"
    assert_close(lse[fin], rlse[fin], torch.float32, name="lse", factor=max(factor, 10.0))
    if not grad:
        return
    do = randn(*out.shape, dtype=q.dtype)
    params = [("q", q), ("k", k), ("v", v)]
    params += [(n, t) for n, t in kw.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out, [t for _, t in params], do)
    rgrads = torch.autograd.grad(rout, [q64, k64, v64] + [d[n] for n, _ in params[3:]], do.double())
    for (n, t), g, rg in zip(params, grads, rgrads):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert_close(g, rg, q.dtype, name=f"d{n}", factor=factor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_odd_sizes(dtype, isa):
    # S 1/7 take the decode path (Sq <= 8), 63/129 the tiled one; D pads to 16 lanes
    for S, D in [(1, 8), (7, 24), (63, 72), (129, 128), (63, 256), (129, 8)]:
        q, k, v = _qkv(2, 4, 2, S, S + 5, D, dtype)
        _check(q, k, v, causal=S > 60, factor=2.0 if dtype == torch.bfloat16 else 1.0)


@pytest.mark.parametrize("Sq", [3, 70])
@pytest.mark.parametrize("feature", ["causal", "bottom_right", "bottom_right_tall", "window",
                                     "kpm", "bool_mask", "add_mask", "add_mask_heads", "softcap",
                                     "sinks", "alibi", "alibi_batch", "all"])
def test_features(feature, Sq):
    B, Hq, Hkv, D = 2, 4, 2, 40
    Sk = 150 if feature != "bottom_right_tall" else 50
    kw = {}
    if feature == "causal":
        kw = dict(causal=True)
    elif feature.startswith("bottom_right"):
        kw = dict(causal=True, bottom_right=True)
    elif feature == "window":
        kw = dict(window=(17, 5), bottom_right=Sq < 8)
    elif feature == "kpm":
        kpm = torch.rand(B, Sk) < 0.3
        kpm[1, :] = True  # batch 1 fully padded: out 0, lse -inf, grads 0
        kw = dict(key_padding_mask=kpm)
    elif feature == "bool_mask":
        m = torch.rand(B, 1, Sq, Sk) < 0.6
        m[0, 0, 1] = False  # a fully masked row
        kw = dict(attn_mask=m)
    elif feature == "add_mask":  # an additive mask that requires grad, broadcast over heads
        kw = dict(attn_mask=randn(B, 1, Sq, Sk, requires_grad=True))
    elif feature == "add_mask_heads":
        kw = dict(attn_mask=randn(1, Hq, 1, Sk, requires_grad=True), causal=True)
    elif feature == "softcap":
        kw = dict(softcap=2.5)
    elif feature == "sinks":
        kw = dict(sinks=randn(Hq, requires_grad=True), window=(10, 0))  # with empty rows
    elif feature == "alibi":
        kw = dict(alibi_slopes=torch.rand(Hq) * 0.3, causal=True)
    elif feature == "alibi_batch":
        kw = dict(alibi_slopes=torch.rand(B, Hq) * 0.3)
    elif feature == "all":
        kpm = torch.rand(B, Sk) < 0.2
        kw = dict(softcap=4.0, sinks=randn(Hq, requires_grad=True), alibi_slopes=torch.rand(Hq) * 0.2,
                  causal=True, bottom_right=True, window=(40, 0), key_padding_mask=kpm,
                  attn_mask=randn(B, Hq, Sq, Sk, requires_grad=True))
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, torch.float32)
    _check(q, k, v, **kw)


@pytest.mark.parametrize("nt", [1, 2, 3])
def test_threads(nt, threads):
    torch.set_num_threads(nt)
    for Sq, Sk, B, H in [(2, 700, 1, 2), (100, 300, 1, 1), (70, 200, 3, 2)]:  # splits Sk / key blocks
        q, k, v = _qkv(B, H, 1, Sq, Sk, 64, torch.float32)
        _check(q, k, v, causal=Sq > 8, bottom_right=True)


def test_deterministic(threads):
    torch.set_num_threads(2)
    q, k, v = _qkv(1, 2, 1, 100, 300, 32, torch.float32)
    do = randn(1, 2, 100, 32)
    res = []
    for _ in range(2):
        with backends.use("cpu"):
            out = fastbig.ops.attention(q, k, v, causal=True)
        res.append([out] + list(torch.autograd.grad(out, (q, k, v), do)))
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_float16_and_strides():
    # [B, S, H, D] storage seen as [B, H, S, D] (strided, D innermost) and a D stride != 1 (copied)
    q = randn(2, 70, 4, 24, dtype=torch.float16).transpose(1, 2).requires_grad_()
    k = randn(2, 90, 2, 24, dtype=torch.float16).transpose(1, 2).requires_grad_()
    v = randn(2, 2, 24, 90, dtype=torch.float16).transpose(2, 3).requires_grad_()
    _check(q, k, v, causal=True)
    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    _check(q[:, :, :5], k, v)  # decode path, strided


def test_nan_inf_rows():
    q, k, v = _qkv(1, 2, 1, 20, 40, 16, torch.float32, grad=False)
    q, k, v = q.clone(), k.clone(), v.clone()
    q[0, 0, 3] = float("nan")
    k[0, 0, 7] = float("inf")  # every row that sees key 7 is NaN in the math
    q[0, 1, 5] = float("inf")
    for Sq in (20, 4):
        with backends.use("cpu"):
            out, lse = fastbig.ops.attention(q[:, :, :Sq], k, v, causal=True, return_lse=True)
        rout, rlse = ref.attention(q[:, :, :Sq].double(), k.double(), v.double(), causal=True,
                                   return_lse=True)
        assert torch.equal(torch.isnan(out), torch.isnan(rout))
        ok = torch.isfinite(rout)
        assert_close(out[ok], rout[ok], torch.float32)
        assert torch.equal(torch.isnan(lse), torch.isnan(rlse))


def test_fully_masked_rows():
    B, H, Sq, Sk, D = 1, 2, 12, 30, 16
    q, k, v = _qkv(B, H, H, Sq, Sk, D, torch.float32)
    m = torch.ones(B, H, Sq, Sk, dtype=torch.bool)
    m[:, :, 2] = False
    sinks = randn(H)
    for s in (None, sinks):
        with backends.use("cpu"):
            out, lse = fastbig.ops.attention(q, k, v, attn_mask=m, sinks=s, return_lse=True)
        assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
        exp = torch.full((B, H), float("-inf")) if s is None else s.expand(B, H)
        assert torch.equal(lse[:, :, 2], exp)
        dq, = torch.autograd.grad(out, q, torch.ones_like(out))
        assert torch.equal(dq[:, :, 2], torch.zeros_like(dq[:, :, 2]))


def test_varlen():
    lens_q, lens_k = [5, 70, 1], [40, 90, 0]
    cq = torch.tensor([0, 5, 75, 76], dtype=torch.int32)
    ck = torch.tensor([0, 40, 130, 130], dtype=torch.int32)
    q = randn(76, 4, 32, requires_grad=True)
    k = randn(130, 2, 32, requires_grad=True)
    v = randn(130, 2, 32, requires_grad=True)
    sinks = randn(4)
    with backends.use("cpu"):
        out = fastbig.ops.attention_varlen(q, k, v, cq, ck, max(lens_q), max(lens_k), causal=True,
                                           bottom_right=True, sinks=sinks)
    rout = ref.attention_varlen(q.double(), k.double(), v.double(), cq, ck, causal=True,
                                bottom_right=True, sinks=sinks.double())
    assert_close(out, rout, torch.float32)


def test_opcheck():
    q, k, v = _qkv(1, 2, 1, 20, 33, 16, torch.float32)
    mask = randn(1, 2, 20, 33, requires_grad=True)
    sinks = randn(2, requires_grad=True)
    args = (q, k, v, mask, None, sinks, None, 0.25, 0.0, -1, 0, False)
    torch.library.opcheck(torch.ops.fastbig.attention_cpu_fwd.default, args)
    q, k, v = _qkv(1, 2, 1, 3, 33, 16, torch.bfloat16)
    torch.library.opcheck(torch.ops.fastbig.attention_cpu_fwd.default,
                          (q, k, v, None, torch.rand(1, 33) < 0.2, None, torch.rand(2), 0.25, 3.0,
                           5, -1, True))


def test_bad_input():
    op = torch.ops.fastbig.attention_cpu_fwd
    q, k, v = _qkv(1, 2, 1, 10, 12, 16, torch.float32, grad=False)
    with pytest.raises(RuntimeError, match="k must have q's dtype"):
        op(q, k.double(), v, None, None, None, None, 1.0, 0.0, -1, -1, False)
    with pytest.raises(RuntimeError, match="Hq must be a multiple of Hkv"):
        op(q, k.expand(1, 3, 12, 16), v.expand(1, 3, 12, 16), None, None, None, None, 1.0, 0.0, -1, -1, False)
    with pytest.raises(RuntimeError, match="attn_mask must be broadcastable"):
        op(q, k, v, torch.zeros(10, 5), None, None, None, 1.0, 0.0, -1, -1, False)
    with pytest.raises(RuntimeError, match="key_padding_mask must have shape"):
        op(q, k, v, None, torch.zeros(1, 5, dtype=torch.bool), None, None, 1.0, 0.0, -1, -1, False)
    with pytest.raises(RuntimeError, match="sinks must have shape"):
        op(q, k, v, None, None, torch.zeros(3), None, 1.0, 0.0, -1, -1, False)
    with pytest.raises(RuntimeError, match="alibi_slopes must have shape"):
        op(q, k, v, None, None, None, torch.zeros(2, 2), 1.0, 0.0, -1, -1, False)


def test_auto_rule():
    q, k, v = _qkv(1, 2, 1, 10, 12, 16, torch.float32, grad=False)
    feats = _Features("attention", q, 2, 1, None, None, None, False)
    use = _attention_cpu.use_ours
    assert not use(q, 1, 10, 12, -1, -1, None, None, 0.1, feats)  # dropout: SDPA
    assert not use(q.double(), 1, 10, 12, -1, -1, None, None, 0.0, feats)  # float64: SDPA
    with backends.use("cpu"):
        assert use(q, 1, 10, 12, -1, -1, None, None, 0.0, feats)  # forced
    capped = _Features("attention", q, 2, 1, 5.0, None, None, False)
    assert use(q, 1, 10, 12, -1, -1, None, None, 0.0, capped)  # SDPA has no softcap
    # the measured table: ours exactly where an entry lists it
    for (dt, kind, grad), rows in _attention_cpu._WINS.items():
        assert kind in ("decode", "causal", "causal_padded", "full") and isinstance(grad, bool)
        for max_t, min_t, lo, hi in rows:
            assert 1 <= min_t <= max_t and 0 <= lo < hi, (dt, kind)
    # a measured loss: fp32 full forward at B4 H8 S512 D64 (0.58x at 2 threads, 0.86x at 1)
    q5 = torch.empty(4, 8, 512, 64)
    assert not use(q5, 4, 512, 512, -1, -1, None, None, 0.0, feats)
    # a measured win: bf16 decode B1 H32 Sk16384 D128 (4.2x at 1 thread, 2.7x at 2)
    qd = torch.empty(1, 32, 1, 128, dtype=torch.bfloat16)
    assert use(qd, 1, 1, 16384, -1, -1, None, None, 0.0, feats) == (torch.get_num_threads() <= 2)


def test_auto_rule_counts_a_gradient_for_k_or_v_alone():
    """A training call whose q needs no gradient (a frozen query projection, cross-attention
    onto a trained memory) takes the fwd+bwd table, not the forward one."""
    feats = _Features("attention", torch.empty(4, 8, 512, 64), 8, 4, None, None, None, False)
    q5 = torch.empty(4, 8, 512, 64)
    k5 = torch.empty(4, 8, 512, 64, requires_grad=True)
    v5 = torch.empty(4, 8, 512, 64)
    use = _attention_cpu.use_ours
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        # fp32 full: SDPA for the forward, ours for fwd+bwd at this size (the measured table)
        assert not use(q5, 4, 512, 512, -1, -1, None, None, 0.0, feats, kv=(k5.detach(), v5))
        assert use(q5, 4, 512, 512, -1, -1, None, None, 0.0, feats, kv=(k5, v5))
        with torch.no_grad():
            assert not use(q5, 4, 512, 512, -1, -1, None, None, 0.0, feats, kv=(k5, v5))
    finally:
        torch.set_num_threads(old)


def test_auto_takes_ours_for_a_padded_causal_prefill():
    """Causal with key padding: SDPA would get a dense mask and do the whole Sq x Sk; the measured
    table sends it to ours at 1-2 threads (ratios in _WINS), and the answer is the reference's."""
    q, k, v = _qkv(2, 4, 2, 256, 256, 64, torch.float32, grad=False)  # work 33.5 (table: >= 30)
    kpm = torch.zeros(2, 256, dtype=torch.bool)
    kpm[0, :70] = True
    feats = _Features("attention", q, 4, 2, None, None, None, False)
    old = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            assert _attention_cpu.use_ours(q, 2, 256, 256, -1, 0, None, kpm, 0.0, feats, kv=(k, v))
            assert not _attention_cpu.use_ours(q, 2, 256, 256, -1, -1, None, kpm, 0.0, feats, kv=(k, v))
    finally:
        torch.set_num_threads(old)
    out = fastbig.ops.attention(q, k, v, causal=True, key_padding_mask=kpm)
    assert_close(out, ref.attention(q.double(), k.double(), v.double(), causal=True,
                                    key_padding_mask=kpm), torch.float32)
