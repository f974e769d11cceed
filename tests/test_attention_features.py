"""The features of the models people run, through fastbig.ops.attention / attention_varlen on
every backend that takes them: logit softcap, attention sinks, ALiBi slopes, bottom-right causal.

Oracle: the float64 reference (its own first-principles tests are in test_reference_attention.py).
"""
import warnings

import pytest
import torch

import fastbig
from conftest import assert_close, randn
from fastbig import backends
from fastbig.backends import FastbigFallbackWarning
from fastbig.reference import attention as ref

# (name, kwargs builder): each feature alone and all of them together
FEATURES = {
    "softcap": lambda B, Hq: dict(softcap=3.0),
    "sinks": lambda B, Hq: dict(sinks=randn(Hq, requires_grad=True)),
    "alibi": lambda B, Hq: dict(alibi_slopes=torch.rand(Hq) * 0.5),
    "alibi_per_batch": lambda B, Hq: dict(alibi_slopes=torch.rand(B, Hq) * 0.5),
    "bottom_right_causal": lambda B, Hq: dict(causal=True, bottom_right=True),
    "all": lambda B, Hq: dict(softcap=4.0, sinks=randn(Hq, requires_grad=True),
                              alibi_slopes=torch.rand(Hq) * 0.3, causal=True, bottom_right=True,
                              window=(6, 0)),
}


def _qkv(B=2, Hq=4, Hkv=2, Sq=9, Sk=21, D=16, dtype=torch.float32):
    return (randn(B, Hq, Sq, D, dtype=dtype, requires_grad=True),
            randn(B, Hkv, Sk, D, dtype=dtype, requires_grad=True),
            randn(B, Hkv, Sk, D, dtype=dtype, requires_grad=True))


def _d(kw):
    return {n: (t.detach().double().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor)
                and t.is_floating_point() else t) for n, t in kw.items()}


def _check_against_reference(q, k, v, kw, *, key_padding_mask=None, attn_mask=None):
    out, lse = fastbig.ops.attention(q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                     return_lse=True, **kw)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    kw64 = _d(kw)
    am = attn_mask.double() if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    rout, rlse = ref.attention(q64, k64, v64, key_padding_mask=key_padding_mask, attn_mask=am,
                               return_lse=True, **kw64)
    assert_close(out, rout, q.dtype, name="out")
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert_close(lse[fin], rlse[fin], q.dtype, name="lse")
    do = randn(*out.shape, dtype=q.dtype)
    params = [(n, t) for n, t in (("q", q), ("k", k), ("v", v))]
    params += [(n, t) for n, t in kw.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out, [t for _, t in params], do)
    params64 = [q64, k64, v64] + [kw64[n] for n, _ in params[3:]]
    rgrads = torch.autograd.grad(rout, params64, do.double())
    for (n, _), g, rg in zip(params, grads, rgrads):
        assert_close(g, rg, q.dtype, name=f"d{n}")


@pytest.mark.parametrize("feature", sorted(FEATURES))
@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
def test_each_feature_against_the_float64_reference(feature, backend):
    if backend == "triton" and not (torch.cuda.is_available() or backends.triton_interpret()):
        pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1")
    q, k, v = _qkv()
    kw = FEATURES[feature](2, 4)
    with backends.use(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore", FastbigFallbackWarning)
        _check_against_reference(q, k, v, kw)


@pytest.mark.parametrize("feature", ["sinks", "alibi", "bottom_right_causal", "all"])
def test_features_with_masks_and_padding(feature):
    q, k, v = _qkv(Sq=7, Sk=7)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[0, :2] = True   # left padding
    kpm[1, -3:] = True  # right padding
    amask = randn(2, 1, 7, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FastbigFallbackWarning)
        _check_against_reference(q, k, v, FEATURES[feature](2, 4), key_padding_mask=kpm)
        _check_against_reference(q, k, v, FEATURES[feature](2, 4), attn_mask=amask)


def test_bottom_right_causal_equals_the_explicit_cache_mask_on_the_cpu_path():
    """Sq < Sk with a cache: no dense mask is needed, and the answer is SDPA's tril(Sk - Sq)."""
    q, k, v = _qkv(Sq=3, Sk=11)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastbigFallbackWarning)  # the CPU path takes it
        out = fastbig.ops.attention(q, k, v, causal=True, bottom_right=True)
    tril = torch.ones(3, 11, dtype=torch.bool).tril(8)
    exp = ref.attention(q.double(), k.double(), v.double(), attn_mask=tril)
    assert_close(out, exp, torch.float32)
    # top-left (the default, SDPA's is_causal) differs on such shapes
    assert (fastbig.ops.attention(q, k, v, causal=True) - out).abs().max() > 1e-3


def test_the_cpu_path_takes_alibi_and_the_reference_takes_softcap_with_one_warning():
    q, k, v = _qkv()
    backends._reset_warnings()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fastbig.ops.attention(q, k, v, alibi_slopes=torch.rand(4))
        assert not [w for w in rec if issubclass(w.category, FastbigFallbackWarning)]
        for _ in range(2):
            fastbig.ops.attention(q, k, v, softcap=2.0)
    fb = [str(w.message) for w in rec if issubclass(w.category, FastbigFallbackWarning)]
    from fastbig.ops import _attention_cpu
    if _attention_cpu.available():  # fastbig's own CPU kernel takes softcap: no fallback
        assert fb == [], fb
    else:
        assert len(fb) == 1 and "softcap" in fb[0], fb


@pytest.mark.parametrize("feature", ["softcap", "sinks", "alibi_per_batch", "all"])
def test_varlen_features(feature):
    """Each packed sequence on its own: bottom-right aligns per sequence (Sk_b - Sq_b)."""
    lens_q, lens_k = [3, 1, 5], [6, 1, 9]
    cq = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    ck = torch.tensor([0, 6, 7, 16], dtype=torch.int32)
    q = randn(9, 4, 16, requires_grad=True)
    k, v = randn(16, 2, 16, requires_grad=True), randn(16, 2, 16, requires_grad=True)
    kw = FEATURES[feature](3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FastbigFallbackWarning)
        out, lse = fastbig.ops.attention_varlen(q, k, v, cq, ck, 5, 9, return_lse=True, **kw)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    kw64 = _d(kw)
    rout, rlse = ref.attention_varlen(q64, k64, v64, cq, ck, return_lse=True, **kw64)
    assert_close(out, rout, torch.float32, name="out")
    assert_close(lse, rlse, torch.float32, name="lse")
    do = randn(*out.shape)
    g = torch.autograd.grad(out, (q, k, v), do)
    rg = torch.autograd.grad(rout, (q64, k64, v64), do.double())
    for n, a, b in zip("qkv", g, rg):
        assert_close(a, b, torch.float32, name=f"d{n}")
    assert max(lens_q) == 5 and max(lens_k) == 9


@pytest.mark.parametrize("kw,exc,match", [
    (dict(softcap=-1.0), ValueError, r"softcap.*>= 0.*-1"),
    (dict(softcap=float("inf")), ValueError, r"softcap.*finite"),
    (dict(softcap=True), TypeError, r"softcap.*bool"),
    (dict(softcap="3"), TypeError, r"softcap.*str"),
    (dict(sinks=torch.zeros(3)), ValueError, r"sinks.*\(4,\).*\(3,\)"),
    (dict(sinks=torch.zeros(4, dtype=torch.int64)), TypeError, r"sinks.*int64"),
    (dict(sinks=torch.zeros(1, 4)), ValueError, r"sinks.*1-D.*2-D"),
    (dict(sinks=torch.zeros(4, device="meta")), RuntimeError, r"sinks.*meta"),
    (dict(alibi_slopes=torch.zeros(5)), ValueError, r"alibi_slopes.*\[Hq\].*\(5,\)"),
    (dict(alibi_slopes=torch.zeros(3, 4)), ValueError, r"alibi_slopes.*\[B, Hq\].*\(3, 4\)"),
    (dict(alibi_slopes=torch.zeros(4, dtype=torch.int32)), TypeError, r"alibi_slopes.*int32"),
    (dict(bottom_right=1), TypeError, r"bottom_right.*bool.*int"),
])
def test_bad_feature_arguments_are_named(kw, exc, match):
    q, k, v = _qkv()
    with pytest.raises(exc, match=match):
        fastbig.ops.attention(q, k, v, **kw)


def test_features_never_write_into_the_callers_tensors():
    q, k, v = _qkv()
    sinks, slopes = randn(4, requires_grad=True), torch.rand(4)
    snap = [t.detach().clone() for t in (q, k, v, sinks, slopes)]
    out = fastbig.ops.attention(q, k, v, sinks=sinks, alibi_slopes=slopes, softcap=2.0, causal=True,
                                bottom_right=True)
    out.sum().backward()
    for a, b in zip(snap, (q, k, v, sinks, slopes)):
        assert torch.equal(a, b.detach())
