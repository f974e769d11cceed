"""The bad-input table: every public op and module against wrong dtypes, devices, ranks, sizes,
layouts, empty tensors, NaN/inf, integer tensors and masks, and sizes past a kernel's limits.

Each row says what must happen:
- ``raises``: that exception type (ValueError/TypeError/RuntimeError), with a message that names
  the argument (a regex over the message), never a crash; the caller's tensors unmodified;
- ``works``: the right answer (vs the float64 oracle or the torch.nn twin, conftest bounds);
- ``meta``: a "meta" tensor is a device the op cannot compute on; it must either say so clearly
  (an exception naming the device) or propagate shapes (a meta result of the right shape).

``python tests/test_reliability.py`` prints the table with what each row actually did.
"""
from __future__ import annotations

import math
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_close, rel_err, tol  # first: sets TRITON_INTERPRET=1 without a GPU

import fastbig  # noqa: E402
from fastbig import backends  # noqa: E402
from fastbig.backends import FastbigFallbackWarning  # noqa: E402
from fastbig.reference import attention as ref_attn  # noqa: E402
from fastbig.reference import conv_bn_relu as ref_conv  # noqa: E402
from fastbig.reference import lstm as ref_lstm  # noqa: E402

ERRORS = (ValueError, TypeError, RuntimeError)


@dataclass
class Row:
    op: str
    case: str
    build: Callable[[], dict]   # -> dict(call=..., inputs=[tensors], check=fn(result) | None)
    expect: str                 # "raises" | "works" | "meta"
    exc: tuple = ERRORS
    match: Optional[str] = None  # regex the message must contain (the argument's name, ...)


ROWS: list[Row] = []


def row(op, case, expect, exc=ERRORS, match=None):
    def deco(fn):
        ROWS.append(Row(op, case, fn, expect, exc if isinstance(exc, tuple) else (exc,), match))
        return fn
    return deco


def R(*shape, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


def _snap(ts):
    return [t.detach().clone() for t in ts if isinstance(t, torch.Tensor) and t.device.type != "meta"]


def _same(a, b):
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(
            torch.nan_to_num(a, 0.0, 1.0, -1.0), torch.nan_to_num(b, 0.0, 1.0, -1.0))
    return torch.equal(a, b)


def run_row(r: Row):
    """Returns (outcome, detail): outcome 'raised <Type>' or 'works' or 'meta'; raises
    AssertionError when the row's expectation is not met."""
    spec = r.build()
    inputs = [t for t in spec.get("inputs", []) if isinstance(t, torch.Tensor)]
    before = _snap(inputs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FastbigFallbackWarning)
            res = spec["call"]()
    except Exception as e:  # noqa: BLE001 - the table records what was raised
        after = _snap(inputs)
        assert all(_same(b, a) for b, a in zip(before, after)), f"{r.op}/{r.case}: raised AND modified an input"
        outcome = f"raised {type(e).__name__}"
        msg = str(e).split("\n")[0][:160]
        if r.expect == "raises" or (r.expect == "meta" and "meta" in str(e).lower()):
            assert isinstance(e, r.exc), f"{r.op}/{r.case}: raised {type(e).__name__}, expected {r.exc}: {e}"
            if r.match:
                assert re.search(r.match, str(e)), f"{r.op}/{r.case}: message {str(e)!r} does not match {r.match!r}"
            return outcome, msg
        raise AssertionError(f"{r.op}/{r.case}: expected {r.expect}, raised {type(e).__name__}: {e}") from e
    after = _snap(inputs)
    assert all(_same(b, a) for b, a in zip(before, after)), f"{r.op}/{r.case}: modified a caller's tensor"
    if r.expect == "raises":
        raise AssertionError(f"{r.op}/{r.case}: expected {r.exc} naming {r.match!r}, but it returned")
    if r.expect == "meta":
        outs = res if isinstance(res, (tuple, list)) else (res,)
        t = [o for o in outs if isinstance(o, torch.Tensor)][0]
        assert t.device.type == "meta", f"{r.op}/{r.case}: meta input gave a {t.device} result"
        if spec.get("shape") is not None:
            assert tuple(t.shape) == tuple(spec["shape"]), f"{r.op}/{r.case}: meta shape {tuple(t.shape)}"
        return "meta result", f"shape {tuple(t.shape)}"
    detail = ""
    if spec.get("check") is not None:
        detail = spec["check"](res) or ""
    return "works", detail


# =====================================================================================
# attention
# =====================================================================================
def _qkv(B=2, Hq=2, Hkv=1, Sq=5, Sk=7, D=16, dtype=torch.float32, device="cpu"):
    return R(B, Hq, Sq, D, dtype=dtype, device=device), R(B, Hkv, Sk, D, dtype=dtype, device=device), \
        R(B, Hkv, Sk, D, dtype=dtype, device=device)


def _attn_spec(q, k, v, check=None, **kw):
    return dict(call=lambda: fastbig.ops.attention(q, k, v, **kw),
                inputs=[q, k, v] + [t for t in kw.values() if isinstance(t, torch.Tensor)], check=check)


def _attn_ref_check(q, k, v, **kw):
    def check(res):
        out = res[0] if kw.get("return_lse") else res
        r = ref_attn.attention(q.double(), k.double(), v.double(),
                               **{n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
                                  for n, t in kw.items()})
        r = r[0] if kw.get("return_lse") else r
        err = assert_close(out, r, q.dtype)
        return f"rel err {err:.1e}"
    return check


@row("attention", "wrong dtype (complex64)", "raises", TypeError, r"\bq\b.*floating.*complex64")
def _():
    q, k, v = _qkv()
    return _attn_spec(q.to(torch.complex64), k, v)


@row("attention", "mixed dtypes (k float64)", "raises", TypeError, r"\bk\b.*float64.*float32")
def _():
    q, k, v = _qkv()
    return _attn_spec(q, k.double(), v)


@row("attention", "wrong device (all meta)", "meta")
def _():
    q, k, v = _qkv(device="meta")
    return dict(_attn_spec(q, k, v), shape=(2, 2, 5, 16))


@row("attention", "mixed devices (v on meta)", "raises", RuntimeError, r"\bv\b.*meta.*cpu")
def _():
    q, k, v = _qkv()
    return _attn_spec(q, k, v.to("meta"))


@row("attention", "wrong rank (q 3-D)", "raises", ValueError, r"\bq\b.*4-D.*3-D")
def _():
    q, k, v = _qkv()
    return _attn_spec(q[0], k, v)


@row("attention", "wrong sizes (k head dim 8 vs 16)", "raises", ValueError, r"head dim")
def _():
    q, k, v = _qkv()
    return _attn_spec(q, k[..., :8], v[..., :8])


@row("attention", "k/v shapes differ", "raises", ValueError, r"\bk\b.*\bv\b")
def _():
    q, k, v = _qkv()
    return _attn_spec(q, k, v[:, :, :3])


@row("attention", "mismatched batch (k batch 1 vs 2)", "raises", ValueError, r"batch")
def _():
    q, k, v = _qkv()
    return _attn_spec(q, k[:1], v[:1])


@row("attention", "mismatched heads (Hq=3, Hkv=2)", "raises", ValueError, r"Hq=3.*Hkv=2")
def _():
    q, k, v = _qkv(Hq=3, Hkv=2)
    return _attn_spec(q, k, v)


@row("attention", "non-contiguous q/k/v (transposed storage)", "works")
def _():
    q, k, v = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in _qkv())
    return _attn_spec(q, k, v, check=_attn_ref_check(q, k, v, causal=True), causal=True)


@row("attention", "non-contiguous q/k/v, return_lse", "works")
def _():
    q, k, v = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in _qkv())
    return _attn_spec(q, k, v, check=_attn_ref_check(q, k, v, return_lse=True), return_lse=True)


@row("attention", "expanded (stride 0) batch and mask", "works")
def _():
    q, k, v = (t[:1].expand(3, -1, -1, -1) for t in _qkv())
    m = R(1, 1, 5, 7).expand(3, 2, 5, 7)
    return _attn_spec(q, k, v, check=_attn_ref_check(q, k, v, attn_mask=m), attn_mask=m)


@row("attention", "empty batch (B=0)", "works")
def _():
    q, k, v = _qkv(B=0)
    return _attn_spec(q, k, v, check=lambda o: f"shape {tuple(o.shape)}" if o.shape == (0, 2, 5, 16)
                      else (_ for _ in ()).throw(AssertionError(f"shape {tuple(o.shape)}")))


@row("attention", "empty query seq (Sq=0)", "works")
def _():
    q, k, v = _qkv(Sq=0)
    return _attn_spec(q, k, v, check=_attn_ref_check(q, k, v))


def _zeros_check(out):
    assert out.shape == (2, 2, 5, 16) and torch.equal(out, torch.zeros_like(out)), "expected all-zero rows"
    return "all rows 0 (fully masked)"


@row("attention", "empty key seq (Sk=0): rows give 0", "works")
def _():
    q, k, v = _qkv(Sk=0)
    return _attn_spec(q, k, v, check=_zeros_check)


@row("attention", "empty key seq (Sk=0), reference backend", "works")
def _():
    q, k, v = _qkv(Sk=0)

    def call():
        with backends.use("reference"):
            return fastbig.ops.attention(q, k, v)
    return dict(call=call, inputs=[q, k, v], check=_zeros_check)


def _nan_pattern_check(q, k, v, **kw):
    def check(out):
        r = ref_attn.attention(q.double(), k.double(), v.double(), **kw)
        assert torch.equal(out.isnan(), r.isnan()), "NaN pattern differs from the reference (torch math)"
        fin = ~r.isnan()
        assert r.isnan().any(), "the case must produce NaN"
        assert rel_err(out[fin], r[fin]) <= tol(q.dtype)
        return f"{int(r.isnan().sum())} NaN, as the reference"
    return check


@row("attention", "head dim 0 (D=0): an empty output, as SDPA", "works")
def _():
    q, k, v = _qkv(D=0)

    def check(out):
        assert out.shape == (2, 2, 5, 0), out.shape  # (1/sqrt(D) was a ZeroDivisionError)
        return "empty [2, 2, 5, 0]"
    return _attn_spec(q, k, v, check=check)


@row("attention", "NaN in one query row", "works")
def _():
    q, k, v = _qkv()
    q[1, 0, 2, 3] = float("nan")
    return _attn_spec(q, k, v, check=_nan_pattern_check(q, k, v))


@row("attention", "inf in one key", "works")
def _():
    q, k, v = _qkv()
    k[0, 0, 4, 0] = float("inf")
    return _attn_spec(q, k, v, check=_nan_pattern_check(q, k, v))


@row("attention", "head dim 512 (past the Triton kernel's 256), auto", "works")
def _():
    q, k, v = _qkv(D=512, Sq=3, Sk=4)
    return _attn_spec(q, k, v, check=_attn_ref_check(q, k, v))


@row("attention", "integer q/k/v", "raises", TypeError, r"\bq\b.*floating.*int32")
def _():
    q, k, v = (t.to(torch.int32) for t in _qkv())
    return _attn_spec(q, k, v)


@row("attention", "integer attn_mask (int64)", "raises", TypeError, r"attn_mask.*bool.*int64")
def _():
    q, k, v = _qkv()
    return _attn_spec(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.int64))


@row("attention", "uint8 key_padding_mask", "raises", TypeError, r"key_padding_mask.*bool.*uint8")
def _():
    q, k, v = _qkv()
    return _attn_spec(q, k, v, key_padding_mask=torch.zeros(2, 7, dtype=torch.uint8))


@row("attention", "attn_mask wrong shape", "raises", ValueError, r"attn_mask.*broadcastable")
def _():
    q, k, v = _qkv()
    return _attn_spec(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.bool))


@row("attention", "dropout_p out of range", "raises", ValueError, r"dropout_p")
def _():
    q, k, v = _qkv()
    return _attn_spec(q, k, v, dropout_p=1.5)


# the same layouts and edge cases through the Triton kernels (the interpreter on CPU tensors)
def _triton_spec(spec):
    call = spec["call"]

    def run():
        if not fastbig.backends.triton_interpret() and not torch.cuda.is_available():
            raise RuntimeError("needs TRITON_INTERPRET=1")  # pragma: no cover
        with backends.use("triton"):
            return call()
    return dict(spec, call=run)


@row("attention[triton]", "non-contiguous q/k/v, return_lse", "works")
def _():
    q, k, v = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in _qkv())
    return _triton_spec(_attn_spec(q, k, v, check=_attn_ref_check(q, k, v, causal=True, return_lse=True),
                                   causal=True, return_lse=True))


@row("attention[triton]", "expanded (stride 0) batch and mask", "works")
def _():
    q, k, v = (t[:1].expand(3, -1, -1, -1) for t in _qkv())
    m = R(1, 1, 5, 7).expand(3, 2, 5, 7)
    return _triton_spec(_attn_spec(q, k, v, check=_attn_ref_check(q, k, v, attn_mask=m), attn_mask=m))


@row("attention[triton]", "empty key seq (Sk=0): rows give 0", "works")
def _():
    q, k, v = _qkv(Sk=0)
    return _triton_spec(_attn_spec(q, k, v, check=_zeros_check))


@row("attention[triton]", "empty batch (B=0)", "works")
def _():
    q, k, v = _qkv(B=0)
    return _triton_spec(_attn_spec(q, k, v, check=lambda o: f"shape {tuple(o.shape)}" if o.shape == (0, 2, 5, 16)
                                   else (_ for _ in ()).throw(AssertionError(f"shape {tuple(o.shape)}"))))


@row("attention[triton]", "NaN in one query row", "works")
def _():
    q, k, v = _qkv()
    q[1, 0, 2, 3] = float("nan")
    return _triton_spec(_attn_spec(q, k, v, check=_nan_pattern_check(q, k, v)))


@row("attention[triton]", "head dim 512, forced triton", "raises", RuntimeError, r"head dim.*256.*512")
def _():
    q, k, v = _qkv(D=512, Sq=3, Sk=4)
    return _triton_spec(_attn_spec(q, k, v))


# =====================================================================================
# attention_varlen
# =====================================================================================
def _varlen(lens_q=(3, 0, 5), lens_k=(4, 2, 6), H=2, Hkv=1, D=16, dtype=torch.float32):
    cq = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    ck = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    q = R(int(cq[-1]), H, D, dtype=dtype)
    k = R(int(ck[-1]), Hkv, D, dtype=dtype)
    v = R(int(ck[-1]), Hkv, D, dtype=dtype)
    return q, k, v, cq, ck, max(lens_q), max(lens_k)


def _varlen_spec(q, k, v, cq, ck, mq, mk, check=None, **kw):
    return dict(call=lambda: fastbig.ops.attention_varlen(q, k, v, cq, ck, mq, mk, **kw),
                inputs=[q, k, v, cq, ck], check=check)


def _varlen_check(q, k, v, cq, ck, **kw):
    def check(out):
        r = ref_attn.attention_varlen(q.double(), k.double(), v.double(), cq, ck, **kw)
        return f"rel err {assert_close(out, r, q.dtype):.1e}"
    return check


@row("attention_varlen", "wrong dtype (int32 q)", "raises", TypeError, r"\bq\b.*floating")
def _():
    q, k, v, cq, ck, mq, mk = _varlen()
    return _varlen_spec(q.to(torch.int32), k, v, cq, ck, mq, mk)


@row("attention_varlen", "mixed dtypes (v float16)", "raises", TypeError, r"\bv\b.*float16")
def _():
    q, k, v, cq, ck, mq, mk = _varlen()
    return _varlen_spec(q, k, v.half(), cq, ck, mq, mk)


@row("attention_varlen", "wrong rank (q 4-D)", "raises", ValueError, r"\bq\b.*3-D")
def _():
    q, k, v, cq, ck, mq, mk = _varlen()
    return _varlen_spec(q[None], k, v, cq, ck, mq, mk)


@row("attention_varlen", "float cu_seqlens_q", "raises", ValueError, r"cu_seqlens_q.*int32")
def _():
    q, k, v, cq, ck, mq, mk = _varlen()
    return _varlen_spec(q, k, v, cq.float(), ck, mq, mk)


@row("attention_varlen", "cu_seqlens_k not ending at total_k", "raises", ValueError, r"cu_seqlens_k")
def _():
    q, k, v, cq, ck, mq, mk = _varlen()
    ck = ck.clone()
    ck[-1] += 1
    return _varlen_spec(q, k, v, cq, ck, mq, mk)


@row("attention_varlen", "cu_seqlens on meta (mixed devices)", "raises", RuntimeError, r"cu_seqlens_q.*meta")
def _():
    q, k, v, cq, ck, mq, mk = _varlen()
    return _varlen_spec(q, k, v, cq.to("meta"), ck, mq, mk)


@row("attention_varlen", "max_seqlen_q below the longest", "raises", ValueError, r"max_seqlen_q")
def _():
    q, k, v, cq, ck, mq, mk = _varlen()
    return _varlen_spec(q, k, v, cq, ck, 2, mk)


@row("attention_varlen", "batch mismatch (cu_seqlens lengths differ)", "raises", ValueError, r"cu_seqlens")
def _():
    q, k, v, cq, ck, mq, mk = _varlen()
    return _varlen_spec(q, k, v, cq, ck[:-1].clone(), mq, mk)


@row("attention_varlen", "an empty sequence and non-contiguous q", "works")
def _():
    q, k, v, cq, ck, mq, mk = _varlen()
    q = q.transpose(0, 1).contiguous().transpose(0, 1)
    return _varlen_spec(q, k, v, cq, ck, mq, mk, check=_varlen_check(q, k, v, cq, ck, causal=True),
                        causal=True)


# =====================================================================================
# nn.functional.scaled_dot_product_attention (torch's semantics)
# =====================================================================================
def _sdpa_oracle(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """SDPA's semantics through fastbig's float64 reference (never torch's SDPA kernel, whose
    NaN handling depends on the CPU's instruction set): any leading batch dims, rank 3 = no head
    dim."""
    lead = q.shape[:-2]
    as4 = (lambda t: t.unsqueeze(1)) if q.dim() == 3 else (lambda t: t.reshape(-1, *t.shape[-3:]))
    q4, k4, v4 = (as4(t.double()) for t in (q, k, v))
    mask = None
    if attn_mask is not None:
        m = attn_mask if attn_mask.dtype == torch.bool else attn_mask.double()
        mask = as4(m.expand(*lead, q.shape[-2], k.shape[-2]))
    out = ref_attn.attention(q4, k4, v4, causal=is_causal, attn_mask=mask, scale=scale)
    return out.reshape(*lead, q.shape[-2], v.shape[-1])


def _sdpa_spec(q, k, v, check_values=True, **kw):
    def check(out):
        r = _sdpa_oracle(q, k, v, **kw)
        if r.isnan().any() or out.isnan().any():
            assert torch.equal(out.isnan(), r.isnan()), "NaN pattern differs from the float64 reference"
            fin = ~r.isnan()
            return f"NaN as the reference; rel err {assert_close(out[fin], r[fin], q.dtype):.1e}"
        return f"rel err {assert_close(out, r, q.dtype):.1e}"
    return dict(call=lambda: fastbig.nn.functional.scaled_dot_product_attention(q, k, v, **kw),
                inputs=[q, k, v] + [t for t in kw.values() if isinstance(t, torch.Tensor)],
                check=check if check_values else None)


@row("sdpa", "integer query", "raises", TypeError, r"\bq(uery)?\b.*int64")
def _():
    q, k, v = _qkv(Hkv=2)
    return _sdpa_spec(q.long(), k, v, check_values=False)


@row("sdpa", "mixed dtypes (key float64)", "raises", TypeError, r"\bk(ey)?\b.*float64")
def _():
    q, k, v = _qkv(Hkv=2)
    return _sdpa_spec(q, k.double(), v, check_values=False)


@row("sdpa", "wrong rank (1-D)", "raises", ValueError, r"query.*2-D")
def _():
    q, k, v = _qkv(Hkv=2)
    return _sdpa_spec(q[0, 0, 0], k, v, check_values=False)


@row("sdpa", "heads differ without enable_gqa", "raises", RuntimeError, r"enable_gqa")
def _():
    q, k, v = _qkv(Hq=4, Hkv=3)  # 1 kv head broadcasts in torch's SDPA; 3 of 4 does not
    return _sdpa_spec(q, k, v, check_values=False)


@row("sdpa", "is_causal with attn_mask", "raises", RuntimeError, r"attn_mask")
def _():
    q, k, v = _qkv(Hkv=2)
    return _sdpa_spec(q, k, v, check_values=False, is_causal=True, attn_mask=torch.ones(5, 7, dtype=torch.bool))


@row("sdpa", "mixed devices (value on meta)", "raises", RuntimeError, r"\bv(alue)?\b.*meta")
def _():
    q, k, v = _qkv(Hkv=2)
    return _sdpa_spec(q, k, v.to("meta"), check_values=False)


@row("sdpa", "non-contiguous 3-D inputs", "works")
def _():
    q, k, v = (t[0].transpose(-1, -2).contiguous().transpose(-1, -2) for t in _qkv(Hkv=2))
    return _sdpa_spec(q, k, v, is_causal=True)


@row("sdpa", "expanded 5-D inputs with a bool mask", "works")
def _():
    q, k, v = (t[None].expand(3, -1, -1, -1, -1) for t in _qkv(Hkv=2))
    return _sdpa_spec(q, k, v, attn_mask=torch.rand(5, 7) > 0.3)


@row("sdpa", "empty batch", "works")
def _():
    q, k, v = _qkv(B=0, Hkv=2)
    return _sdpa_spec(q, k, v)


@row("sdpa", "NaN in query", "works")
def _():
    q, k, v = _qkv(Hkv=2)
    q[0, 1, 1, 1] = float("nan")
    return _sdpa_spec(q, k, v)


# =====================================================================================
# lstm_cell
# =====================================================================================
def _cell(B=3, H=5, dtype=torch.float32):
    return R(B, 4 * H, dtype=dtype, scale=2.0), R(B, H, dtype=dtype)


def _cell_spec(g, c, check=True):
    def chk(res):
        h, cn = res
        hr, cr = ref_lstm.lstm_cell_pointwise(g.double(), c.double())
        if hr.isnan().any():
            assert torch.equal(h.isnan(), hr.isnan()) and torch.equal(cn.isnan(), cr.isnan()), "NaN pattern"
            return f"{int(hr.isnan().sum())} NaN in h, as the reference"
        return f"rel err {max(assert_close(h, hr, g.dtype), assert_close(cn, cr, g.dtype)):.1e}"
    return dict(call=lambda: fastbig.ops.lstm_cell(g, c), inputs=[g, c], check=chk if check else None)


@row("lstm_cell", "wrong dtype (complex64)", "raises", TypeError, r"gates.*floating.*complex64")
def _():
    g, c = _cell()
    return _cell_spec(g.to(torch.complex64), c)


@row("lstm_cell", "mixed dtypes (c_prev float64)", "raises", TypeError, r"c_prev.*float64.*float32")
def _():
    g, c = _cell()
    return _cell_spec(g, c.double())


@row("lstm_cell", "wrong device (all meta)", "meta")
def _():
    g, c = _cell()
    return dict(_cell_spec(g.to("meta"), c.to("meta"), check=False), shape=(3, 5))


@row("lstm_cell", "mixed devices (c_prev on meta)", "raises", RuntimeError, r"c_prev.*meta")
def _():
    g, c = _cell()
    return _cell_spec(g, c.to("meta"))


@row("lstm_cell", "wrong rank (gates 1-D)", "raises", ValueError, r"gates.*2-D.*1-D")
def _():
    g, c = _cell()
    return _cell_spec(g[0], c)


@row("lstm_cell", "wrong sizes (gates not 4*H)", "raises", ValueError, r"gates.*multiple of 4")
def _():
    g, c = _cell()
    return _cell_spec(g[:, :-1], c)


@row("lstm_cell", "mismatched batch (c_prev batch 2 vs 3)", "raises", ValueError, r"c_prev.*shape")
def _():
    g, c = _cell()
    return _cell_spec(g, c[:2])


@row("lstm_cell", "non-contiguous gates (every other column)", "works")
def _():
    g, c = _cell()
    g = torch.stack([g, g], -1)[..., 0]
    return _cell_spec(g, c.t().contiguous().t())


@row("lstm_cell", "expanded (stride 0) gates and c_prev", "works")
def _():
    g, c = _cell(B=1)
    return _cell_spec(g.expand(4, -1), c.expand(4, -1))


@row("lstm_cell", "empty batch (B=0)", "works")
def _():
    g, c = _cell(B=0)
    return _cell_spec(g, c)


@row("lstm_cell", "NaN and inf in gates", "works")
def _():
    g, c = _cell()
    g[0, 1] = float("nan")
    g[1, 0] = float("inf")    # i gate saturates to 1: finite, as torch
    g[2, 5 + 2] = -float("inf")  # f gate 0
    return _cell_spec(g, c)


@row("lstm_cell", "integer gates", "raises", TypeError, r"gates.*floating.*int64")
def _():
    g, c = _cell()
    return _cell_spec(g.long(), c)


# =====================================================================================
# lstm (layer op)
# =====================================================================================
def _layer(T=4, B=3, I=6, H=5, dtype=torch.float32):
    k = 1 / math.sqrt(H)
    return dict(x=R(T, B, I, dtype=dtype), h0=R(B, H, dtype=dtype), c0=R(B, H, dtype=dtype),
                w_ih=R(4 * H, I, dtype=dtype, scale=k), w_hh=R(4 * H, H, dtype=dtype, scale=k),
                b_ih=R(4 * H, dtype=dtype, scale=k), b_hh=R(4 * H, dtype=dtype, scale=k))


def _layer_spec(a, check=True, **kw):
    order = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh")

    def chk(res):
        y, h, c = res
        x = a["x"]
        x2 = x.reshape(-1, x.shape[-1]) if kw.get("batch_sizes") is None else x
        ry, rh, rc = ref_lstm.lstm_layer(x2.double(), *[a[n].double() for n in order[1:]], **kw)
        ry = ry.view(y.shape)
        if ry.isnan().any():
            assert torch.equal(y.isnan(), ry.isnan()), "NaN pattern"
            return f"{int(ry.isnan().sum())} NaN in y, as the reference"
        return f"rel err {max(assert_close(y, ry, x.dtype), assert_close(c, rc, x.dtype)):.1e}"
    return dict(call=lambda: fastbig.ops.lstm(*[a[n] for n in order], **kw), inputs=list(a.values()),
                check=chk if check else None)


@row("lstm", "integer x", "raises", TypeError, r"\bx\b.*floating.*int64")
def _():
    a = _layer()
    a["x"] = a["x"].long()
    return _layer_spec(a, check=False)


@row("lstm", "mixed dtypes (h0 float64)", "raises", TypeError, r"h0.*float64")
def _():
    a = _layer()
    a["h0"] = a["h0"].double()
    return _layer_spec(a, check=False)


@row("lstm", "wrong device (all meta)", "meta")
def _():
    a = {n: t.to("meta") for n, t in _layer().items()}
    return dict(_layer_spec(a, check=False), shape=(4, 3, 5))


@row("lstm", "mixed devices (w_hh on meta)", "raises", RuntimeError, r"w_hh.*meta")
def _():
    a = _layer()
    a["w_hh"] = a["w_hh"].to("meta")
    return _layer_spec(a, check=False)


@row("lstm", "wrong rank (x 2-D without batch_sizes)", "raises", ValueError, r"\bx\b.*3-D.*2-D")
def _():
    a = _layer()
    a["x"] = a["x"][0]
    return _layer_spec(a, check=False)


@row("lstm", "wrong sizes (input_size 7 vs 6)", "raises", RuntimeError, r"input_size.*6.*7")
def _():
    a = _layer()
    a["x"] = R(4, 3, 7)
    return _layer_spec(a, check=False)


@row("lstm", "mismatched batch (h0 batch 2 vs 3)", "raises", ValueError, r"h0.*shape")
def _():
    a = _layer()
    a["h0"] = a["h0"][:2]
    return _layer_spec(a, check=False)


@row("lstm", "bad batch_sizes (increasing)", "raises", ValueError, r"batch_sizes")
def _():
    a = _layer()
    a["x"] = R(6, 6)
    return _layer_spec(a, check=False, batch_sizes=torch.tensor([1, 2, 3]))


@row("lstm", "non-contiguous x and weights", "works")
def _():
    a = _layer()
    a["x"] = a["x"].transpose(0, 1).contiguous().transpose(0, 1)
    a["w_ih"] = a["w_ih"].t().contiguous().t()
    a["b_ih"] = torch.stack([a["b_ih"], a["b_ih"]], -1)[:, 0]
    return _layer_spec(a)


@row("lstm", "expanded (stride 0) x over the batch", "works")
def _():
    a = _layer()
    a["x"] = a["x"][:, :1].expand(-1, 3, -1)
    return _layer_spec(a)


@row("lstm", "empty sequence (T=0)", "raises", ValueError, r"\bx\b.*non-empty")
def _():
    a = _layer(T=0)
    return _layer_spec(a, check=False)


@row("lstm", "NaN in x at one step", "works")
def _():
    a = _layer()
    a["x"][2, 1, 0] = float("nan")
    return _layer_spec(a)


# =====================================================================================
# conv_bn_act
# =====================================================================================
def _conv(N=2, C=3, K=4, Hs=6, dtype=torch.float32):
    return dict(x=R(N, C, Hs, Hs, dtype=dtype), w=R(K, C, 3, 3, dtype=dtype, scale=0.3),
                bw=R(K, dtype=dtype).abs() + 0.5, bb=R(K, dtype=dtype), rm=R(K, dtype=dtype) * 0.1,
                rv=R(K, dtype=dtype).abs() + 0.5, nbt=torch.tensor(3))


def _conv_spec(a, check=True, training=True, **kw):
    def chk(y):
        rm, rv, nbt = a["rm"].clone(), a["rv"].clone(), a["nbt"].clone()
        ry, _ = ref_conv.conv_bn_act(a["x"].double(), a["w"].double(), None, a["bw"].double(), a["bb"].double(),
                                     rm.double(), rv.double(), nbt, training=training, padding=1, **kw)
        if ry.isnan().any():
            assert torch.equal(y.isnan(), ry.isnan()), "NaN pattern differs from the reference"
            return f"{int(ry.isnan().sum())} NaN, as the reference"
        return f"rel err {assert_close(y, ry, a['x'].dtype):.1e}"
    fixed = [a["x"], a["w"], a["bw"], a["bb"]]
    return dict(call=lambda: fastbig.ops.conv_bn_act(a["x"], a["w"], None, a["bw"], a["bb"], a["rm"].clone(),
                                                     a["rv"].clone(), a["nbt"].clone(), training=training,
                                                     padding=1, **kw),
                inputs=fixed, check=chk if check else None)


@row("conv_bn_act", "integer x", "raises", TypeError, r"\bx\b.*floating.*int64")
def _():
    a = _conv()
    a["x"] = a["x"].long()
    return _conv_spec(a, check=False)


@row("conv_bn_act", "mixed dtypes (conv_weight float64)", "raises", TypeError, r"conv_weight.*float64")
def _():
    a = _conv()
    a["w"] = a["w"].double()
    return _conv_spec(a, check=False)


@row("conv_bn_act", "wrong device (all meta)", "meta")
def _():
    a = {n: t.to("meta") for n, t in _conv().items()}
    return dict(_conv_spec(a, check=False), shape=(2, 4, 6, 6))


@row("conv_bn_act", "mixed devices (bn_weight on meta)", "raises", RuntimeError, r"bn_weight.*meta")
def _():
    a = _conv()
    a["bw"] = a["bw"].to("meta")
    return _conv_spec(a, check=False)


@row("conv_bn_act", "wrong rank (x 3-D)", "raises", ValueError, r"\bx\b.*4-D.*3-D")
def _():
    a = _conv()
    a["x"] = a["x"][0]
    return _conv_spec(a, check=False)


@row("conv_bn_act", "wrong sizes (x 5 channels, weight 3)", "raises", ValueError, r"\bx\b.*3 channels")
def _():
    a = _conv()
    a["x"] = R(2, 5, 6, 6)
    return _conv_spec(a, check=False)


@row("conv_bn_act", "bn_weight of the wrong length", "raises", ValueError, r"bn_weight.*\(4,\)")
def _():
    a = _conv()
    a["bw"] = a["bw"][:3]
    return _conv_spec(a, check=False)


@row("conv_bn_act", "non-contiguous x (every other column)", "works")
def _():
    a = _conv()
    a["x"] = torch.stack([a["x"], a["x"]], -1)[..., 0]
    return _conv_spec(a)


@row("conv_bn_act", "channels_last x", "works")
def _():
    a = _conv()
    a["x"] = a["x"].contiguous(memory_format=torch.channels_last)
    return _conv_spec(a)


@row("conv_bn_act", "expanded (stride 0) x over channels", "works")
def _():
    a = _conv()
    a["x"] = a["x"][:, :1].expand(-1, 3, -1, -1)
    return _conv_spec(a)


@row("conv_bn_act", "empty batch (N=0), training: empty output, stats kept, batch counted", "works")
def _():
    a = _conv(N=0)
    rm, rv, nbt = a["rm"].clone(), a["rv"].clone(), a["nbt"].clone()

    def check(y):  # torch's batch_norm on an empty batch (and BatchNorm2d's count)
        assert y.shape == (0, 4, 6, 6)
        assert torch.equal(rm, a["rm"]) and torch.equal(rv, a["rv"]) and int(nbt) == int(a["nbt"]) + 1
        return "empty, running stats unchanged, num_batches_tracked + 1"
    return dict(call=lambda: fastbig.ops.conv_bn_act(a["x"], a["w"], None, a["bw"], a["bb"], rm, rv, nbt,
                                                     training=True, padding=1),
                inputs=[a["x"], a["w"], a["bw"], a["bb"]], check=check)


@row("conv_bn_act", "output_padding on a conv (not transposed)", "raises", ValueError, r"output_padding.*transposed")
def _():
    return _conv_spec(_conv(), check=False, output_padding=1)


@row("conv_bn_act", "output_padding >= stride, transposed, eval", "raises", RuntimeError,
     r"output_padding.*stride")
def _():
    a = _conv()
    a["w"] = R(3, 4, 3, 3)  # ConvTranspose2d weight [in, out, kH, kW]
    return _conv_spec(a, check=False, training=False, transposed=True, output_padding=2)


@row("conv_bn_act", "eps=True (a bool)", "raises", ValueError, r"eps must be a number > 0.*True")
def _():
    return _conv_spec(_conv(), check=False, eps=True)


@row("conv_bn_act", "negative_slope a string (relu)", "raises", TypeError, r"negative_slope.*str")
def _():
    return _conv_spec(_conv(), check=False, negative_slope="0.1")


@row("conv_bn_act", "num_batches_tracked on meta", "raises", RuntimeError, r"num_batches_tracked.*meta")
def _():
    a = _conv()
    a["nbt"] = a["nbt"].to("meta")
    return _conv_spec(a, check=False)


def _fold_spec(**over):
    a = _conv()
    args = dict(conv_weight=a["w"], conv_bias=None, bn_weight=a["bw"], bn_bias=a["bb"], running_mean=a["rm"],
                running_var=a["rv"], eps=1e-5)
    args.update(over)
    return dict(call=lambda: fastbig.ops.fold_bn(**args),
                inputs=[t for t in args.values() if isinstance(t, torch.Tensor)])


@row("fold_bn", "eps=0 (was a silent inf)", "raises", ValueError, r"eps")
def _():
    return _fold_spec(eps=0.0)


@row("fold_bn", "running_var None", "raises", TypeError, r"running_var")
def _():
    return _fold_spec(running_var=None)


@row("fold_bn", "bn_weight of the wrong length", "raises", ValueError, r"bn_weight.*\(4,\)")
def _():
    return _fold_spec(bn_weight=R(5))


@row("fold_bn", "integer conv_weight (was silently truncated)", "raises", TypeError, r"conv_weight.*floating")
def _():
    return _fold_spec(conv_weight=R(4, 3, 3, 3).mul(10).long())


@row("conv_bn_act", "empty batch (N=0), eval", "works")
def _():
    a = _conv(N=0)
    return _conv_spec(a, training=False)


@row("conv_bn_act", "NaN in one pixel (training: the channel's stats go NaN)", "works")
def _():
    a = _conv()
    a["x"][1, 0, 2, 2] = float("nan")
    return _conv_spec(a)


@row("conv_bn_act", "bad activation name", "raises", ValueError, r"activation")
def _():
    return _conv_spec(_conv(), check=False, activation="gelu")


# =====================================================================================
# modules: each against its torch.nn twin
# =====================================================================================
def _twin_spec(fmod, tmod, args, kwargs=None, pick=lambda o: o, check=True):
    kwargs = kwargs or {}
    tmod.load_state_dict(fmod.state_dict())

    def chk(res):
        out = pick(res)
        with torch.no_grad():
            r = pick(tmod(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                            for a in args], **kwargs)) if next(tmod.parameters()).dtype == torch.float64 else \
                pick(tmod(*args, **kwargs))
        if r.isnan().any():
            assert torch.equal(out.isnan(), r.isnan()), "NaN pattern differs from torch.nn"
            return f"{int(r.isnan().sum())} NaN, as torch.nn"
        return f"rel err vs torch.nn {assert_close(out, r, out.dtype, factor=1.0):.1e}"
    return dict(call=lambda: fmod(*args, **kwargs), inputs=[a for a in args if isinstance(a, torch.Tensor)],
                check=chk if check else None)


def _mha(batch_first=True):
    torch.manual_seed(1)
    f = fastbig.nn.MultiheadAttention(16, 2, batch_first=batch_first)
    t = nn.MultiheadAttention(16, 2, batch_first=batch_first).double()
    return f, t


_NW = dict(need_weights=False)


@row("MultiheadAttention", "input float64 into a float32 module", "raises", TypeError,
     r"query.*float32.*float64")
def _():
    f, t = _mha()
    x = R(2, 5, 16).double()
    return _twin_spec(f, t, (x, x, x), _NW, pick=lambda o: o[0], check=False)


@row("MultiheadAttention", "integer query", "raises", TypeError, r"query.*float32.*int64")
def _():
    f, t = _mha()
    x = R(2, 5, 16).long()
    return _twin_spec(f, t, (x, x, x), _NW, pick=lambda o: o[0], check=False)


@row("MultiheadAttention", "value float64, query/key float32 (need_weights=True)", "raises", TypeError,
     r"value.*float32.*float64")
def _():
    f, t = _mha()
    x = R(2, 5, 16)
    return _twin_spec(f, t, (x, x, x.double()), dict(need_weights=True), pick=lambda o: o[0], check=False)


@row("MultiheadAttention", "bfloat16 input into a float32 module under autocast", "works")
def _():
    f, _t = _mha()
    x = R(2, 5, 16).bfloat16()

    def call():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return f(x, x, x, need_weights=False)[0]

    def check(out):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            r = nn.MultiheadAttention.forward(f, x, x, x, need_weights=False)[0]
        assert out.dtype == r.dtype == torch.bfloat16, (out.dtype, r.dtype)
        return f"rel err vs torch.nn under autocast {assert_close(out, r.double(), torch.bfloat16):.1e}"
    return dict(call=call, inputs=[x], check=check)


@row("MultiheadAttention", "integer attn_mask (need_weights=False; was taken as additive)", "raises", TypeError,
     r"attn_mask.*int64")
def _():
    f, t = _mha()
    x = R(2, 5, 16)
    return _twin_spec(f, t, (x, x, x), dict(_NW, attn_mask=(torch.rand(5, 5) > 0.5).long()), pick=lambda o: o[0],
                      check=False)


@row("MultiheadAttention", "uint8 key_padding_mask (need_weights=False)", "raises", TypeError,
     r"key_padding_mask.*uint8")
def _():
    f, t = _mha()
    x = R(2, 5, 16)
    return _twin_spec(f, t, (x, x, x), dict(_NW, key_padding_mask=torch.zeros(2, 5, dtype=torch.uint8)),
                      pick=lambda o: o[0], check=False)


@row("MultiheadAttention", "wrong rank (4-D query)", "raises", ValueError, r"query.*3-D.*4-D")
def _():
    f, t = _mha()
    x = R(1, 2, 5, 16)
    return _twin_spec(f, t, (x, x, x), _NW, pick=lambda o: o[0], check=False)


@row("MultiheadAttention", "wrong embed dim (12 vs 16)", "raises", ValueError, r"embed dim 16.*12")
def _():
    f, t = _mha()
    x = R(2, 5, 12)
    return _twin_spec(f, t, (x, x, x), _NW, pick=lambda o: o[0], check=False)


@row("MultiheadAttention", "key batch differs from query", "raises", ValueError, r"batch")
def _():
    f, t = _mha()
    q, k = R(2, 5, 16), R(3, 7, 16)
    return _twin_spec(f, t, (q, k, k), _NW, pick=lambda o: o[0], check=False)


@row("MultiheadAttention", "meta input (module on cpu)", "raises", RuntimeError, r"query.*meta.*cpu")
def _():
    f, t = _mha()
    x = R(2, 5, 16, device="meta")
    return _twin_spec(f, t, (x, x, x), _NW, pick=lambda o: o[0], check=False)


@row("MultiheadAttention", "non-contiguous seq-first input + bool key_padding_mask", "works")
def _():
    f, t = _mha(batch_first=False)
    x = R(2, 5, 16).transpose(0, 1)  # [S, B, E] as a view of [B, S, E]
    kpm = torch.tensor([[False] * 5, [False, False, False, True, True]])
    return _twin_spec(f, t, (x, x, x), dict(_NW, key_padding_mask=kpm), pick=lambda o: o[0])


@row("MultiheadAttention", "expanded (stride 0) batch", "works")
def _():
    f, t = _mha()
    x = R(1, 5, 16).expand(3, -1, -1)
    return _twin_spec(f, t, (x, x, x), _NW, pick=lambda o: o[0])


@row("MultiheadAttention", "empty batch", "works")
def _():
    f, t = _mha()
    x = R(0, 5, 16)
    return _twin_spec(f, t, (x, x, x), _NW, pick=lambda o: o[0])


@row("MultiheadAttention", "NaN in one token", "works")
def _():
    f, t = _mha()
    x = R(2, 5, 16)
    x[1, 2, 3] = float("nan")
    return _twin_spec(f, t, (x, x, x), _NW, pick=lambda o: o[0])


def _sa(causal=False):
    torch.manual_seed(2)
    f = fastbig.nn.SelfAttention(16, causal=causal)
    from fastbig.models._layers import TorchSelfAttention
    return f, TorchSelfAttention(16, causal=causal)


@row("SelfAttention", "wrong rank (2-D x)", "raises", ValueError, r"\bx\b.*\[B, S, 16\]")
def _():
    f, t = _sa()
    return _twin_spec(f, t, (R(5, 16),), check=False)


@row("SelfAttention", "wrong embed dim", "raises", ValueError, r"\bx\b.*16")
def _():
    f, t = _sa()
    return _twin_spec(f, t, (R(2, 5, 8),), check=False)


@row("SelfAttention", "float64 x into a float32 module", "raises", TypeError, r"\bx\b.*float32.*float64")
def _():
    f, t = _sa()
    return _twin_spec(f, t, (R(2, 5, 16).double(),), check=False)


@row("SelfAttention", "float key_padding_mask", "raises", TypeError, r"key_padding_mask.*bool")
def _():
    f, t = _sa()
    return _twin_spec(f, t, (R(2, 5, 16),), dict(key_padding_mask=torch.zeros(2, 5)), check=False)


@row("SelfAttention", "key_padding_mask wrong shape", "raises", ValueError, r"key_padding_mask")
def _():
    f, t = _sa()
    return _twin_spec(f, t, (R(2, 5, 16),), dict(key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)),
                      check=False)


@row("SelfAttention", "non-contiguous x, causal, key_padding_mask", "works")
def _():
    f, t = _sa(causal=True)
    x = R(5, 2, 16).transpose(0, 1)
    kpm = torch.tensor([[False] * 5, [False, False, False, False, True]])
    return _twin_spec(f, t, (x,), dict(key_padding_mask=kpm))


@row("SelfAttention", "empty batch", "works")
def _():
    f, t = _sa()
    return _twin_spec(f, t, (R(0, 5, 16),))


def _lstm_mod(**kw):
    torch.manual_seed(3)
    return fastbig.nn.LSTM(6, 5, **kw), nn.LSTM(6, 5, **kw)


@row("LSTM", "float64 input into a float32 module", "raises", ERRORS, r"input dtype \(torch.float64\)")
def _():
    f, t = _lstm_mod()
    return _twin_spec(f, t, (R(4, 2, 6).double(),), pick=lambda o: o[0], check=False)


@row("LSTM", "integer input", "raises", ERRORS, r"input dtype \(torch.int64\)")
def _():
    f, t = _lstm_mod()
    return _twin_spec(f, t, (R(4, 2, 6).long(),), pick=lambda o: o[0], check=False)


@row("LSTM", "wrong rank (4-D input)", "raises", ValueError, r"2D or 3D")
def _():
    f, t = _lstm_mod()
    return _twin_spec(f, t, (R(1, 4, 2, 6),), pick=lambda o: o[0], check=False)


@row("LSTM", "wrong input_size (7 vs 6)", "raises", RuntimeError, r"input_size")
def _():
    f, t = _lstm_mod()
    return _twin_spec(f, t, (R(4, 2, 7),), pick=lambda o: o[0], check=False)


@row("LSTM", "h_0 batch mismatch", "raises", RuntimeError, r"hidden")
def _():
    f, t = _lstm_mod()
    return _twin_spec(f, t, (R(4, 2, 6), (R(1, 3, 5), R(1, 3, 5))), pick=lambda o: o[0], check=False)


@row("LSTM", "meta input (module on cpu)", "raises", RuntimeError, None)
def _():
    f, t = _lstm_mod()
    return _twin_spec(f, t, (R(4, 2, 6, device="meta"),), pick=lambda o: o[0], check=False)


@row("LSTM", "non-contiguous batch_first input, 2 layers, bidirectional", "works")
def _():
    f, t = _lstm_mod(batch_first=True, num_layers=2, bidirectional=True)
    return _twin_spec(f, t, (R(4, 3, 6).transpose(0, 1),), pick=lambda o: o[0])


@row("LSTM", "expanded (stride 0) input over the batch", "works")
def _():
    f, t = _lstm_mod()
    return _twin_spec(f, t, (R(4, 1, 6).expand(-1, 3, -1),), pick=lambda o: o[0])


@row("LSTM", "empty batch (B=0)", "works")
def _():
    f, t = _lstm_mod()
    return _twin_spec(f, t, (R(4, 0, 6),), pick=lambda o: o[0])


@row("LSTM", "empty sequence (T=0): torch's RuntimeError", "raises", RuntimeError, r"sequence length")
def _():
    f, t = _lstm_mod()
    with pytest.raises(RuntimeError, match="sequence length"):
        t(R(0, 2, 6))
    return _twin_spec(f, t, (R(0, 2, 6),), pick=lambda o: o[0], check=False)


@row("LSTM", "NaN in the input", "works")
def _():
    f, t = _lstm_mod()
    x = R(4, 2, 6)
    x[1, 0, 2] = float("nan")
    return _twin_spec(f, t, (x,), pick=lambda o: o[0])


def _cell_mod():
    torch.manual_seed(4)
    return fastbig.nn.LSTMCell(6, 5), nn.LSTMCell(6, 5)


@row("LSTMCell", "float64 input into a float32 module", "raises", (RuntimeError, TypeError), r"input.*float64")
def _():
    f, t = _cell_mod()
    return _twin_spec(f, t, (R(3, 6).double(),), pick=lambda o: o[0], check=False)


@row("LSTMCell", "integer input", "raises", (RuntimeError, TypeError), r"input")
def _():
    f, t = _cell_mod()
    return _twin_spec(f, t, (R(3, 6).long(),), pick=lambda o: o[0], check=False)


@row("LSTMCell", "wrong rank (3-D)", "raises", ValueError, r"1D or 2D")
def _():
    f, t = _cell_mod()
    return _twin_spec(f, t, (R(1, 3, 6),), pick=lambda o: o[0], check=False)


@row("LSTMCell", "hx batch mismatch", "raises", RuntimeError, r"batch size")
def _():
    f, t = _cell_mod()
    return _twin_spec(f, t, (R(3, 6), (R(2, 5), R(2, 5))), pick=lambda o: o[0], check=False)


@row("LSTMCell", "meta input", "raises", RuntimeError, r"meta")
def _():
    f, t = _cell_mod()
    return _twin_spec(f, t, (R(3, 6, device="meta"),), pick=lambda o: o[0], check=False)


@row("LSTMCell", "2-D hx for a 1-D input: torch's RuntimeError", "raises", RuntimeError, r"hx\[0\].*1D.*2D")
def _():
    f, t = _cell_mod()
    with pytest.raises(RuntimeError):
        t(R(6), (R(1, 5), R(1, 5)))
    return _twin_spec(f, t, (R(6), (R(1, 5), R(1, 5))), pick=lambda o: o[0], check=False)


@row("LSTMCell", "non-contiguous input and hx", "works")
def _():
    f, t = _cell_mod()
    return _twin_spec(f, t, (R(6, 3).t(), (R(5, 3).t(), R(5, 3).t())), pick=lambda o: o[0])


@row("LSTMCell", "empty batch", "works")
def _():
    f, t = _cell_mod()
    return _twin_spec(f, t, (R(0, 6),), pick=lambda o: o[0])


@row("LSTMCell", "NaN in hx", "works")
def _():
    f, t = _cell_mod()
    h = R(3, 5)
    h[1, 1] = float("nan")
    return _twin_spec(f, t, (R(3, 6), (h, R(3, 5))), pick=lambda o: o[1])


def _cbr(cls=None, transposed=False):
    torch.manual_seed(5)
    if transposed:
        f = fastbig.nn.ConvTransposeBnReLU2d(3, 4, 3, stride=2, padding=1)
        t = nn.Sequential(nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    else:
        f = (cls or fastbig.nn.ConvBnReLU2d)(3, 4, 3, padding=1)
        t = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    return f, t


@row("ConvBnReLU2d", "float64 input into a float32 module", "raises", (RuntimeError, TypeError), r"float64|Double")
def _():
    f, t = _cbr()
    return _twin_spec(f, t, (R(2, 3, 6, 6).double(),), check=False)


@row("ConvBnReLU2d", "integer input", "raises", (RuntimeError, TypeError), r"\bx\b|Long|int64")
def _():
    f, t = _cbr()
    return _twin_spec(f, t, (R(2, 3, 6, 6).long(),), check=False)


@row("ConvBnReLU2d", "wrong rank (3-D input)", "raises", (ValueError, RuntimeError), r"4-D|3-D")
def _():
    f, t = _cbr()
    return _twin_spec(f, t, (R(3, 6, 6),), check=False)


@row("ConvBnReLU2d", "wrong channels (5 vs 3)", "raises", (ValueError, RuntimeError), r"channels")
def _():
    f, t = _cbr()
    return _twin_spec(f, t, (R(2, 5, 6, 6),), check=False)


@row("ConvBnReLU2d", "meta input", "raises", RuntimeError, None)
def _():
    f, t = _cbr()
    return _twin_spec(f, t, (R(2, 3, 6, 6, device="meta"),), check=False)


@row("ConvBnReLU2d", "non-contiguous input (train mode)", "works")
def _():
    f, t = _cbr()
    return _twin_spec(f, t, (R(2, 3, 6, 6).transpose(2, 3),))


@row("ConvBnReLU2d", "expanded (stride 0) input (eval mode)", "works")
def _():
    f, t = _cbr()
    f.eval(), t.eval()
    return _twin_spec(f, t, (R(1, 3, 6, 6).expand(3, -1, -1, -1),))


@row("ConvBnReLU2d", "single value per channel in training", "raises", ValueError, r"more than 1 value")
def _():
    f, t = _cbr()
    return _twin_spec(f, t, (R(1, 3, 1, 1),), check=False)


@row("ConvBnReLU2d", "empty batch (eval)", "works")
def _():
    f, t = _cbr()
    f.eval(), t.eval()
    return _twin_spec(f, t, (R(0, 3, 6, 6),))


@row("ConvBnReLU2d", "empty batch (train), as torch.nn", "works")
def _():
    f, t = _cbr()
    return _twin_spec(f, t, (R(0, 3, 6, 6),))


@row("ConvTransposeBnReLU2d", "output_padding >= stride (eval, no_grad: oneDNN's path), named", "raises",
     RuntimeError, r"output_padding")
def _():
    torch.manual_seed(5)
    f = fastbig.nn.ConvTransposeBnReLU2d(3, 4, 3, stride=1, output_padding=1).eval()
    x = R(2, 3, 5, 5)
    with torch.no_grad(), pytest.raises(RuntimeError, match="output padding must be smaller"):
        nn.ConvTranspose2d(3, 4, 3, stride=1, output_padding=1)(x)  # torch's own type

    def call():
        with torch.no_grad():  # (was oneDNN's "could not create a primitive descriptor")
            return f(x)
    return dict(call=call, inputs=[x])


@row("ConvBnReLU2d", "NaN in the input (train)", "works")
def _():
    f, t = _cbr()
    x = R(2, 3, 6, 6)
    x[0, 1, 2, 2] = float("nan")
    return _twin_spec(f, t, (x,))


@row("ConvBnReLU2d", "NaN in the input (eval)", "works")
def _():
    f, t = _cbr()
    f.eval(), t.eval()
    x = R(2, 3, 6, 6)
    x[0, 1, 2, 2] = float("nan")
    return _twin_spec(f, t, (x,))


@row("ConvBnLeakyReLU2d", "non-contiguous input (train mode)", "works")
def _():
    torch.manual_seed(6)
    f = fastbig.nn.ConvBnLeakyReLU2d(3, 4, 3, padding=1, negative_slope=0.2)
    t = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.LeakyReLU(0.2))
    return _twin_spec(f, t, (R(2, 3, 6, 6).transpose(2, 3),))


@row("ConvBn2d", "integer input", "raises", (RuntimeError, TypeError), None)
def _():
    torch.manual_seed(6)
    f = fastbig.nn.ConvBn2d(3, 4, 3, padding=1)
    t = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
    return _twin_spec(f, t, (R(2, 3, 6, 6).long(),), check=False)


@row("ConvTransposeBnReLU2d", "channels_last input (train mode)", "works")
def _():
    f, t = _cbr(transposed=True)
    return _twin_spec(f, t, (R(2, 3, 5, 5).contiguous(memory_format=torch.channels_last),))


@row("ConvTransposeBnReLU2d", "wrong rank (3-D input, eval)", "raises", (ValueError, RuntimeError), r"4-D|3-D")
def _():
    f, t = _cbr(transposed=True)
    f.eval(), t.eval()
    return _twin_spec(f, t, (R(3, 5, 5),), check=False)


# =====================================================================================
# the table as tests
# =====================================================================================
def _id(r):
    return f"{r.op}: {r.case}"


# rows that still fail because of a reported, unfixed bug (/tmp/bugs/<op>.md): id -> reason.
# strict: when the bug is fixed the row XPASSes, which fails, so the mark gets removed.
KNOWN_BUGS: dict = {
}


def _params():
    out = []
    for r in ROWS:
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[_id(r)])] if _id(r) in KNOWN_BUGS else []
        out.append(pytest.param(r, id=_id(r), marks=marks))
    return out


@pytest.mark.parametrize("r", _params())
def test_bad_input_table(r):
    run_row(r)


# =====================================================================================
# behaviours the table cannot express
# =====================================================================================
def test_fallback_warns_once_for_inputs_no_fast_path_takes():
    """auto falls back to the reference with exactly one FastbigFallbackWarning (per reason)."""
    backends._reset_warnings()
    q, k, v = _qkv()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):  # the CPU path cannot return the lse with dropout
            out, lse = fastbig.ops.attention(q, k, v, dropout_p=0.25, return_lse=True)
    fb = [w for w in rec if issubclass(w.category, FastbigFallbackWarning)]
    assert len(fb) == 1, [str(w.message) for w in fb]
    assert "attention" in str(fb[0].message)
    assert out.shape == q.shape and torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_head_dim_past_the_triton_limit():
    """D=512 is past the Triton kernel's 256: forced triton says so; auto runs another path, right."""
    q, k, v = _qkv(D=512, Sq=3, Sk=4)
    with backends.use("triton"), pytest.raises(RuntimeError, match=r"head dim.*512|512"):
        fastbig.ops.attention(q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastbigFallbackWarning)  # auto on CPU: the CPU path takes it
        out = fastbig.ops.attention(q, k, v)
    assert_close(out, ref_attn.attention(q.double(), k.double(), v.double()), torch.float32)


def test_requires_grad_on_masks():
    """Integer masks cannot require grad (torch refuses at requires_grad_); a float (additive)
    attn_mask that requires grad gets the right gradient; a bool mask gets none."""
    with pytest.raises(RuntimeError, match="floating point"):
        torch.ones(5, 7, dtype=torch.int64).requires_grad_()
    q, k, v = (t.requires_grad_() for t in _qkv())
    m = R(1, 2, 5, 7).requires_grad_()
    for be in ("auto", "reference"):
        with backends.use(be):
            out = fastbig.ops.attention(q, k, v, attn_mask=m)
        gm, gq = torch.autograd.grad(out.square().sum(), (m, q))
        m64, q64 = m.detach().double().requires_grad_(), q.detach().double().requires_grad_()
        r = ref_attn.attention(q64, k.detach().double(), v.detach().double(), attn_mask=m64)
        rm, rq = torch.autograd.grad(r.square().sum(), (m64, q64))
        assert_close(gm, rm, torch.float32, name=f"{be}: grad attn_mask")
        assert_close(gq, rq, torch.float32, name=f"{be}: grad q")
    bm = torch.rand(5, 7) > 0.3
    out = fastbig.ops.attention(q, k, v, attn_mask=bm)
    out.sum().backward()
    assert bm.grad is None and not bm.requires_grad


def test_ops_reject_wrong_python_types():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"\bq\b.*torch.Tensor"):
        fastbig.ops.attention(q.tolist(), k, v)
    with pytest.raises(TypeError, match=r"gates.*torch.Tensor"):
        fastbig.ops.lstm_cell([[1.0] * 8], torch.zeros(1, 2))
    with pytest.raises(TypeError, match=r"causal"):
        fastbig.ops.attention(q, k, v, causal=1)


if __name__ == "__main__":  # print the table
    width = max(len(_id(r)) for r in ROWS)
    for r in ROWS:
        try:
            outcome, detail = run_row(r)
            status = "ok  "
        except Exception as e:  # noqa: BLE001
            outcome, detail, status = "FAIL", f"{type(e).__name__}: {str(e)[:200]}", "FAIL"
        print(f"{status} {_id(r):<{width}}  expect {r.expect:<7} -> {outcome}: {detail}")
    sys.exit(0)


@pytest.mark.parametrize("make", [
    lambda: (fastbig.nn.LSTMCell(5, 6), nn.LSTMCell(5, 6), (torch.randn(3, 5, dtype=torch.float64),)),
    lambda: (fastbig.nn.ConvBnReLU2d(3, 4, 3), nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
             (torch.randn(2, 3, 8, 8, dtype=torch.float64),)),
    lambda: (fastbig.nn.MultiheadAttention(8, 2), nn.MultiheadAttention(8, 2),
             (torch.randn(2, 3, 8, dtype=torch.float64),) * 3),
], ids=["LSTMCell", "ConvBnReLU2d", "MultiheadAttention"])
def test_dtype_mismatch_raises_what_torch_raises_too(make):
    """A drop-in's dtype error is catchable as torch.nn's (RuntimeError) and as fastbig's TypeError."""
    fb, tm, args = make()
    with pytest.raises(Exception) as torch_err:
        tm(*args)
    with pytest.raises(TypeError, match="dtype") as fb_err:
        fb(*args)
    assert isinstance(fb_err.value, type(torch_err.value)), (type(fb_err.value), type(torch_err.value))
