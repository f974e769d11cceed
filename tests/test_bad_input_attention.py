"""The bad-input table of attention: fastbig.ops.attention (auto and forced Triton, which runs
under the interpreter on CPU tensors), attention_varlen, nn.functional.scaled_dot_product_attention
and the MultiheadAttention/SelfAttention modules against wrong dtypes, devices, ranks, sizes,
layouts, empty tensors, NaN/inf, integer masks and head dims past the Triton kernel's limit; plus
the attention behaviours a row cannot express (one fallback warning, masks that require grad).
What raises/works/meta mean: tests/_bad_input.py. ``python tests/test_bad_input_attention.py``
prints the table.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from conftest import assert_close, rel_err, tol  # first: sets TRITON_INTERPRET=1 without a GPU

import fastbig  # noqa: E402
from fastbig import backends  # noqa: E402
from fastbig.backends import FastbigFallbackWarning  # noqa: E402
from fastbig.reference import attention as ref_attn  # noqa: E402

from _bad_input import R, Table, _twin_spec, check_dtype_mismatch_like_torch, print_table, run_row  # noqa: E402

TABLE = Table()
row = TABLE.row


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
def attn_complex64_q_raises_naming_q():
    q, k, v = _qkv()
    return _attn_spec(q.to(torch.complex64), k, v)


@row("attention", "mixed dtypes (k float64)", "raises", TypeError, r"\bk\b.*float64.*float32")
def attn_float64_k_raises_naming_k():
    q, k, v = _qkv()
    return _attn_spec(q, k.double(), v)


@row("attention", "wrong device (all meta)", "meta")
def attn_all_meta_gives_meta_result():
    q, k, v = _qkv(device="meta")
    return dict(_attn_spec(q, k, v), shape=(2, 2, 5, 16))


@row("attention", "mixed devices (v on meta)", "raises", RuntimeError, r"\bv\b.*meta.*cpu")
def attn_v_on_meta_raises_naming_v():
    q, k, v = _qkv()
    return _attn_spec(q, k, v.to("meta"))


@row("attention", "wrong rank (q 3-D)", "raises", ValueError, r"\bq\b.*4-D.*3-D")
def attn_3d_q_raises_naming_rank():
    q, k, v = _qkv()
    return _attn_spec(q[0], k, v)


@row("attention", "wrong sizes (k head dim 8 vs 16)", "raises", ValueError, r"head dim")
def attn_k_head_dim_8_vs_16_raises():
    q, k, v = _qkv()
    return _attn_spec(q, k[..., :8], v[..., :8])


@row("attention", "k/v shapes differ", "raises", ValueError, r"\bk\b.*\bv\b")
def attn_k_v_shapes_differ_raises():
    q, k, v = _qkv()
    return _attn_spec(q, k, v[:, :, :3])


@row("attention", "mismatched batch (k batch 1 vs 2)", "raises", ValueError, r"batch")
def attn_k_batch_1_vs_2_raises():
    q, k, v = _qkv()
    return _attn_spec(q, k[:1], v[:1])


@row("attention", "mismatched heads (Hq=3, Hkv=2)", "raises", ValueError, r"Hq=3.*Hkv=2")
def attn_heads_3_vs_2_raises_naming_both():
    q, k, v = _qkv(Hq=3, Hkv=2)
    return _attn_spec(q, k, v)


@row("attention", "non-contiguous q/k/v (transposed storage)", "works")
def attn_noncontiguous_qkv_causal_matches_reference():
    q, k, v = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in _qkv())
    return _attn_spec(q, k, v, check=_attn_ref_check(q, k, v, causal=True), causal=True)


@row("attention", "non-contiguous q/k/v, return_lse", "works")
def attn_noncontiguous_qkv_return_lse_matches_reference():
    q, k, v = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in _qkv())
    return _attn_spec(q, k, v, check=_attn_ref_check(q, k, v, return_lse=True), return_lse=True)


@row("attention", "expanded (stride 0) batch and mask", "works")
def attn_stride0_batch_and_mask_match_reference():
    q, k, v = (t[:1].expand(3, -1, -1, -1) for t in _qkv())
    m = R(1, 1, 5, 7).expand(3, 2, 5, 7)
    return _attn_spec(q, k, v, check=_attn_ref_check(q, k, v, attn_mask=m), attn_mask=m)


@row("attention", "empty batch (B=0)", "works")
def attn_empty_batch_gives_empty_output():
    q, k, v = _qkv(B=0)
    return _attn_spec(q, k, v, check=lambda o: f"shape {tuple(o.shape)}" if o.shape == (0, 2, 5, 16)
                      else (_ for _ in ()).throw(AssertionError(f"shape {tuple(o.shape)}")))


@row("attention", "empty query seq (Sq=0)", "works")
def attn_empty_query_seq_matches_reference():
    q, k, v = _qkv(Sq=0)
    return _attn_spec(q, k, v, check=_attn_ref_check(q, k, v))


def _zeros_check(out):
    assert out.shape == (2, 2, 5, 16) and torch.equal(out, torch.zeros_like(out)), "expected all-zero rows"
    return "all rows 0 (fully masked)"


@row("attention", "empty key seq (Sk=0): rows give 0", "works")
def attn_empty_key_seq_gives_zero_rows():
    q, k, v = _qkv(Sk=0)
    return _attn_spec(q, k, v, check=_zeros_check)


@row("attention", "empty key seq (Sk=0), reference backend", "works")
def attn_empty_key_seq_reference_backend_gives_zero_rows():
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
def attn_head_dim_0_gives_empty_output():
    q, k, v = _qkv(D=0)

    def check(out):
        assert out.shape == (2, 2, 5, 0), out.shape  # (1/sqrt(D) was a ZeroDivisionError)
        return "empty [2, 2, 5, 0]"
    return _attn_spec(q, k, v, check=check)


@row("attention", "NaN in one query row", "works")
def attn_nan_in_query_row_matches_reference_nan_pattern():
    q, k, v = _qkv()
    q[1, 0, 2, 3] = float("nan")
    return _attn_spec(q, k, v, check=_nan_pattern_check(q, k, v))


@row("attention", "inf in one key", "works")
def attn_inf_in_key_matches_reference_nan_pattern():
    q, k, v = _qkv()
    k[0, 0, 4, 0] = float("inf")
    return _attn_spec(q, k, v, check=_nan_pattern_check(q, k, v))


@row("attention", "head dim 512 (past the Triton kernel's 256), auto", "works")
def attn_head_dim_512_auto_matches_reference():
    q, k, v = _qkv(D=512, Sq=3, Sk=4)
    return _attn_spec(q, k, v, check=_attn_ref_check(q, k, v))


@row("attention", "integer q/k/v", "raises", TypeError, r"\bq\b.*floating.*int32")
def attn_int32_qkv_raises_naming_q():
    q, k, v = (t.to(torch.int32) for t in _qkv())
    return _attn_spec(q, k, v)


@row("attention", "integer attn_mask (int64)", "raises", TypeError, r"attn_mask.*bool.*int64")
def attn_int64_attn_mask_raises_naming_attn_mask():
    q, k, v = _qkv()
    return _attn_spec(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.int64))


@row("attention", "uint8 key_padding_mask", "raises", TypeError, r"key_padding_mask.*bool.*uint8")
def attn_uint8_key_padding_mask_raises():
    q, k, v = _qkv()
    return _attn_spec(q, k, v, key_padding_mask=torch.zeros(2, 7, dtype=torch.uint8))


@row("attention", "attn_mask wrong shape", "raises", ValueError, r"attn_mask.*broadcastable")
def attn_attn_mask_wrong_shape_raises():
    q, k, v = _qkv()
    return _attn_spec(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.bool))


@row("attention", "dropout_p out of range", "raises", ValueError, r"dropout_p")
def attn_dropout_p_out_of_range_raises():
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
def triton_noncontiguous_qkv_return_lse_matches_reference():
    q, k, v = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in _qkv())
    return _triton_spec(_attn_spec(q, k, v, check=_attn_ref_check(q, k, v, causal=True, return_lse=True),
                                   causal=True, return_lse=True))


@row("attention[triton]", "expanded (stride 0) batch and mask", "works")
def triton_stride0_batch_and_mask_match_reference():
    q, k, v = (t[:1].expand(3, -1, -1, -1) for t in _qkv())
    m = R(1, 1, 5, 7).expand(3, 2, 5, 7)
    return _triton_spec(_attn_spec(q, k, v, check=_attn_ref_check(q, k, v, attn_mask=m), attn_mask=m))


@row("attention[triton]", "empty key seq (Sk=0): rows give 0", "works")
def triton_empty_key_seq_gives_zero_rows():
    q, k, v = _qkv(Sk=0)
    return _triton_spec(_attn_spec(q, k, v, check=_zeros_check))


@row("attention[triton]", "empty batch (B=0)", "works")
def triton_empty_batch_gives_empty_output():
    q, k, v = _qkv(B=0)
    return _triton_spec(_attn_spec(q, k, v, check=lambda o: f"shape {tuple(o.shape)}" if o.shape == (0, 2, 5, 16)
                                   else (_ for _ in ()).throw(AssertionError(f"shape {tuple(o.shape)}"))))


@row("attention[triton]", "NaN in one query row", "works")
def triton_nan_in_query_row_matches_reference_nan_pattern():
    q, k, v = _qkv()
    q[1, 0, 2, 3] = float("nan")
    return _triton_spec(_attn_spec(q, k, v, check=_nan_pattern_check(q, k, v)))


@row("attention[triton]", "head dim 512, forced triton", "raises", RuntimeError, r"head dim.*256.*512")
def triton_head_dim_512_raises_naming_limit():
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
def varlen_int32_q_raises_naming_q():
    q, k, v, cq, ck, mq, mk = _varlen()
    return _varlen_spec(q.to(torch.int32), k, v, cq, ck, mq, mk)


@row("attention_varlen", "mixed dtypes (v float16)", "raises", TypeError, r"\bv\b.*float16")
def varlen_float16_v_raises_naming_v():
    q, k, v, cq, ck, mq, mk = _varlen()
    return _varlen_spec(q, k, v.half(), cq, ck, mq, mk)


@row("attention_varlen", "wrong rank (q 4-D)", "raises", ValueError, r"\bq\b.*3-D")
def varlen_4d_q_raises_naming_rank():
    q, k, v, cq, ck, mq, mk = _varlen()
    return _varlen_spec(q[None], k, v, cq, ck, mq, mk)


@row("attention_varlen", "float cu_seqlens_q", "raises", ValueError, r"cu_seqlens_q.*int32")
def varlen_float_cu_seqlens_q_raises():
    q, k, v, cq, ck, mq, mk = _varlen()
    return _varlen_spec(q, k, v, cq.float(), ck, mq, mk)


@row("attention_varlen", "cu_seqlens_k not ending at total_k", "raises", ValueError, r"cu_seqlens_k")
def varlen_cu_seqlens_k_past_total_k_raises():
    q, k, v, cq, ck, mq, mk = _varlen()
    ck = ck.clone()
    ck[-1] += 1
    return _varlen_spec(q, k, v, cq, ck, mq, mk)


@row("attention_varlen", "cu_seqlens on meta (mixed devices)", "raises", RuntimeError, r"cu_seqlens_q.*meta")
def varlen_cu_seqlens_q_on_meta_raises():
    q, k, v, cq, ck, mq, mk = _varlen()
    return _varlen_spec(q, k, v, cq.to("meta"), ck, mq, mk)


@row("attention_varlen", "max_seqlen_q below the longest", "raises", ValueError, r"max_seqlen_q")
def varlen_max_seqlen_q_too_small_raises():
    q, k, v, cq, ck, mq, mk = _varlen()
    return _varlen_spec(q, k, v, cq, ck, 2, mk)


@row("attention_varlen", "batch mismatch (cu_seqlens lengths differ)", "raises", ValueError, r"cu_seqlens")
def varlen_cu_seqlens_lengths_differ_raises():
    q, k, v, cq, ck, mq, mk = _varlen()
    return _varlen_spec(q, k, v, cq, ck[:-1].clone(), mq, mk)


@row("attention_varlen", "an empty sequence and non-contiguous q", "works")
def varlen_empty_sequence_noncontiguous_q_matches_reference():
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
def sdpa_int64_query_raises():
    q, k, v = _qkv(Hkv=2)
    return _sdpa_spec(q.long(), k, v, check_values=False)


@row("sdpa", "mixed dtypes (key float64)", "raises", TypeError, r"\bk(ey)?\b.*float64")
def sdpa_float64_key_raises():
    q, k, v = _qkv(Hkv=2)
    return _sdpa_spec(q, k.double(), v, check_values=False)


@row("sdpa", "wrong rank (1-D)", "raises", ValueError, r"query.*2-D")
def sdpa_1d_query_raises_naming_rank():
    q, k, v = _qkv(Hkv=2)
    return _sdpa_spec(q[0, 0, 0], k, v, check_values=False)


@row("sdpa", "heads differ without enable_gqa", "raises", RuntimeError, r"enable_gqa")
def sdpa_heads_differ_without_enable_gqa_raises():
    q, k, v = _qkv(Hq=4, Hkv=3)  # 1 kv head broadcasts in torch's SDPA; 3 of 4 does not
    return _sdpa_spec(q, k, v, check_values=False)


@row("sdpa", "is_causal with attn_mask", "raises", RuntimeError, r"attn_mask")
def sdpa_is_causal_with_attn_mask_raises():
    q, k, v = _qkv(Hkv=2)
    return _sdpa_spec(q, k, v, check_values=False, is_causal=True, attn_mask=torch.ones(5, 7, dtype=torch.bool))


@row("sdpa", "mixed devices (value on meta)", "raises", RuntimeError, r"\bv(alue)?\b.*meta")
def sdpa_value_on_meta_raises():
    q, k, v = _qkv(Hkv=2)
    return _sdpa_spec(q, k, v.to("meta"), check_values=False)


@row("sdpa", "non-contiguous 3-D inputs", "works")
def sdpa_noncontiguous_3d_inputs_match_reference():
    q, k, v = (t[0].transpose(-1, -2).contiguous().transpose(-1, -2) for t in _qkv(Hkv=2))
    return _sdpa_spec(q, k, v, is_causal=True)


@row("sdpa", "expanded 5-D inputs with a bool mask", "works")
def sdpa_stride0_5d_inputs_bool_mask_match_reference():
    q, k, v = (t[None].expand(3, -1, -1, -1, -1) for t in _qkv(Hkv=2))
    return _sdpa_spec(q, k, v, attn_mask=torch.rand(5, 7) > 0.3)


@row("sdpa", "empty batch", "works")
def sdpa_empty_batch_matches_reference():
    q, k, v = _qkv(B=0, Hkv=2)
    return _sdpa_spec(q, k, v)


@row("sdpa", "NaN in query", "works")
def sdpa_nan_in_query_matches_reference_nan_pattern():
    q, k, v = _qkv(Hkv=2)
    q[0, 1, 1, 1] = float("nan")
    return _sdpa_spec(q, k, v)


# =====================================================================================
# MultiheadAttention and SelfAttention: each against its torch.nn twin
# =====================================================================================
def _mha(batch_first=True):
    torch.manual_seed(1)
    f = fastbig.nn.MultiheadAttention(16, 2, batch_first=batch_first)
    t = nn.MultiheadAttention(16, 2, batch_first=batch_first).double()
    return f, t


_NW = dict(need_weights=False)


@row("MultiheadAttention", "input float64 into a float32 module", "raises", TypeError,
     r"query.*float32.*float64")
def mha_float64_input_raises_naming_query():
    f, t = _mha()
    x = R(2, 5, 16).double()
    return _twin_spec(f, t, (x, x, x), _NW, pick=lambda o: o[0], check=False)


@row("MultiheadAttention", "integer query", "raises", TypeError, r"query.*float32.*int64")
def mha_int64_query_raises():
    f, t = _mha()
    x = R(2, 5, 16).long()
    return _twin_spec(f, t, (x, x, x), _NW, pick=lambda o: o[0], check=False)


@row("MultiheadAttention", "value float64, query/key float32 (need_weights=True)", "raises", TypeError,
     r"value.*float32.*float64")
def mha_float64_value_need_weights_raises_naming_value():
    f, t = _mha()
    x = R(2, 5, 16)
    return _twin_spec(f, t, (x, x, x.double()), dict(need_weights=True), pick=lambda o: o[0], check=False)


@row("MultiheadAttention", "bfloat16 input into a float32 module under autocast", "works")
def mha_bfloat16_under_autocast_matches_torch():
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
def mha_int64_attn_mask_raises():
    f, t = _mha()
    x = R(2, 5, 16)
    return _twin_spec(f, t, (x, x, x), dict(_NW, attn_mask=(torch.rand(5, 5) > 0.5).long()), pick=lambda o: o[0],
                      check=False)


@row("MultiheadAttention", "uint8 key_padding_mask (need_weights=False)", "raises", TypeError,
     r"key_padding_mask.*uint8")
def mha_uint8_key_padding_mask_raises():
    f, t = _mha()
    x = R(2, 5, 16)
    return _twin_spec(f, t, (x, x, x), dict(_NW, key_padding_mask=torch.zeros(2, 5, dtype=torch.uint8)),
                      pick=lambda o: o[0], check=False)


@row("MultiheadAttention", "wrong rank (4-D query)", "raises", ValueError, r"query.*3-D.*4-D")
def mha_4d_query_raises_naming_rank():
    f, t = _mha()
    x = R(1, 2, 5, 16)
    return _twin_spec(f, t, (x, x, x), _NW, pick=lambda o: o[0], check=False)


@row("MultiheadAttention", "wrong embed dim (12 vs 16)", "raises", ValueError, r"embed dim 16.*12")
def mha_embed_dim_12_vs_16_raises():
    f, t = _mha()
    x = R(2, 5, 12)
    return _twin_spec(f, t, (x, x, x), _NW, pick=lambda o: o[0], check=False)


@row("MultiheadAttention", "key batch differs from query", "raises", ValueError, r"batch")
def mha_key_batch_differs_raises():
    f, t = _mha()
    q, k = R(2, 5, 16), R(3, 7, 16)
    return _twin_spec(f, t, (q, k, k), _NW, pick=lambda o: o[0], check=False)


@row("MultiheadAttention", "meta input (module on cpu)", "raises", RuntimeError, r"query.*meta.*cpu")
def mha_meta_input_raises_naming_devices():
    f, t = _mha()
    x = R(2, 5, 16, device="meta")
    return _twin_spec(f, t, (x, x, x), _NW, pick=lambda o: o[0], check=False)


@row("MultiheadAttention", "non-contiguous seq-first input + bool key_padding_mask", "works")
def mha_noncontiguous_seq_first_with_padding_mask_matches_torch():
    f, t = _mha(batch_first=False)
    x = R(2, 5, 16).transpose(0, 1)  # [S, B, E] as a view of [B, S, E]
    kpm = torch.tensor([[False] * 5, [False, False, False, True, True]])
    return _twin_spec(f, t, (x, x, x), dict(_NW, key_padding_mask=kpm), pick=lambda o: o[0])


@row("MultiheadAttention", "expanded (stride 0) batch", "works")
def mha_stride0_batch_matches_torch():
    f, t = _mha()
    x = R(1, 5, 16).expand(3, -1, -1)
    return _twin_spec(f, t, (x, x, x), _NW, pick=lambda o: o[0])


@row("MultiheadAttention", "empty batch", "works")
def mha_empty_batch_matches_torch():
    f, t = _mha()
    x = R(0, 5, 16)
    return _twin_spec(f, t, (x, x, x), _NW, pick=lambda o: o[0])


@row("MultiheadAttention", "NaN in one token", "works")
def mha_nan_token_matches_torch_nan_pattern():
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
def self_attn_2d_x_raises_naming_shape():
    f, t = _sa()
    return _twin_spec(f, t, (R(5, 16),), check=False)


@row("SelfAttention", "wrong embed dim", "raises", ValueError, r"\bx\b.*16")
def self_attn_wrong_embed_dim_raises():
    f, t = _sa()
    return _twin_spec(f, t, (R(2, 5, 8),), check=False)


@row("SelfAttention", "float64 x into a float32 module", "raises", TypeError, r"\bx\b.*float32.*float64")
def self_attn_float64_x_raises():
    f, t = _sa()
    return _twin_spec(f, t, (R(2, 5, 16).double(),), check=False)


@row("SelfAttention", "float key_padding_mask", "raises", TypeError, r"key_padding_mask.*bool")
def self_attn_float_key_padding_mask_raises():
    f, t = _sa()
    return _twin_spec(f, t, (R(2, 5, 16),), dict(key_padding_mask=torch.zeros(2, 5)), check=False)


@row("SelfAttention", "key_padding_mask wrong shape", "raises", ValueError, r"key_padding_mask")
def self_attn_key_padding_mask_wrong_shape_raises():
    f, t = _sa()
    return _twin_spec(f, t, (R(2, 5, 16),), dict(key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)),
                      check=False)


@row("SelfAttention", "non-contiguous x, causal, key_padding_mask", "works")
def self_attn_noncontiguous_causal_padded_matches_torch():
    f, t = _sa(causal=True)
    x = R(5, 2, 16).transpose(0, 1)
    kpm = torch.tensor([[False] * 5, [False, False, False, False, True]])
    return _twin_spec(f, t, (x,), dict(key_padding_mask=kpm))


@row("SelfAttention", "empty batch", "works")
def self_attn_empty_batch_matches_torch():
    f, t = _sa()
    return _twin_spec(f, t, (R(0, 5, 16),))


# =====================================================================================
# the table as tests
# =====================================================================================
@pytest.mark.parametrize("r", TABLE.params())
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
    with pytest.raises(TypeError, match=r"causal"):
        fastbig.ops.attention(q, k, v, causal=1)


@pytest.mark.parametrize("make", [
    lambda: (fastbig.nn.MultiheadAttention(8, 2), nn.MultiheadAttention(8, 2),
             (torch.randn(2, 3, 8, dtype=torch.float64),) * 3),
], ids=["MultiheadAttention"])
def test_dtype_mismatch_raises_what_torch_raises_too(make):
    check_dtype_mismatch_like_torch(*make())


if __name__ == "__main__":  # print the table
    print_table(TABLE.rows)
