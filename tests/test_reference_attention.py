"""The attention oracle equals F.scaled_dot_product_attention in float64 wherever SDPA defines
the case (and agrees with first principles where SDPA has no such argument)."""
import pytest
import torch
import torch.nn.functional as F

from fastbig.reference import attention as ref
from conftest import randn


def _qkv(B=2, Hq=4, Hkv=4, Sq=17, Sk=23, D=16):
    q = randn(B, Hq, Sq, D, dtype=torch.float64, requires_grad=True)
    k = randn(B, Hkv, Sk, D, dtype=torch.float64, requires_grad=True)
    v = randn(B, Hkv, Sk, D, dtype=torch.float64, requires_grad=True)
    return q, k, v


def _same(a, b, tol=1e-12):
    assert a.shape == b.shape
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    # relative in the 2-norm; a gradient that is exactly 0 in exact math (seq 1: softmax of one
    # key is 1) is compared absolutely, since SDPA leaves rounding noise of 1e-17 there
    err = ((a - b).norm() / (b.norm() if b.norm() > 1e-12 else 1.0)).item()
    assert err < tol, err


def _compare(q, k, v, ref_kw, sdpa_kw):
    out = ref.attention(q, k, v, **ref_kw)
    exp = F.scaled_dot_product_attention(q, k, v, **sdpa_kw)
    _same(out, exp)
    do = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(exp, (q, k, v), do)):
        _same(a, b)


@pytest.mark.parametrize("Sq,Sk", [(1, 1), (17, 23), (23, 17), (64, 64)])
def test_plain_and_causal(Sq, Sk):
    q, k, v = _qkv(Sq=Sq, Sk=Sk)
    _compare(q, k, v, {}, {})
    _compare(q, k, v, {"causal": True}, {"is_causal": True})  # top-left, as SDPA


def test_scale_and_gqa():
    q, k, v = _qkv(Hq=6, Hkv=2)
    _compare(q, k, v, {"scale": 0.3}, {"scale": 0.3, "enable_gqa": True})
    q, k, v = _qkv(Hq=4, Hkv=1)  # MQA
    _compare(q, k, v, {"causal": True}, {"is_causal": True, "enable_gqa": True})


@pytest.mark.parametrize("shape", [(17, 23), (2, 1, 17, 23), (1, 4, 17, 23), (2, 4, 17, 23)])
def test_bool_and_additive_masks(shape):
    q, k, v = _qkv()
    bmask = torch.rand(*shape) > 0.3
    _compare(q, k, v, {"attn_mask": bmask}, {"attn_mask": bmask})
    amask = randn(*shape, dtype=torch.float64)
    _compare(q, k, v, {"attn_mask": amask}, {"attn_mask": amask})


def test_key_padding_and_window_equal_their_bool_masks():
    q, k, v = _qkv(Sq=30, Sk=30)
    kpm = torch.rand(2, 30) > 0.7
    _compare(q, k, v, {"key_padding_mask": kpm}, {"attn_mask": ~kpm[:, None, None, :]})
    i, j = torch.arange(30)[:, None], torch.arange(30)[None, :]
    band = (j >= i - 5) & (j <= i + 2)
    _compare(q, k, v, {"window": (5, 2)}, {"attn_mask": band})
    _compare(q, k, v, {"window": (5, None), "causal": True}, {"attn_mask": band & (j <= i)})


def test_fully_masked_rows_give_zero():
    q, k, v = _qkv()
    m = torch.rand(2, 4, 17, 23) > 0.3
    m[0, 1, 4] = False
    m[1, :, 9:] = False
    out, lse = ref.attention(q, k, v, attn_mask=m, return_lse=True)
    assert torch.all(out[0, 1, 4] == 0) and torch.all(out[1, :, 9:] == 0)
    assert torch.isneginf(lse[0, 1, 4]) and torch.isneginf(lse[1, :, 9:]).all()
    g = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(t).all() for t in g)
    assert torch.all(g[0][0, 1, 4] == 0)
    _compare(q, k, v, {"attn_mask": m}, {"attn_mask": m})  # SDPA gives 0 on such rows too


def test_lse_and_dropout_keep_from_first_principles():
    q, k, v = _qkv(Hq=2, Hkv=2)
    amask = randn(17, 23, dtype=torch.float64)
    out, lse = ref.attention(q, k, v, attn_mask=amask, scale=0.2, return_lse=True)
    scores = q @ k.transpose(-1, -2) * 0.2 + amask
    _same(lse, torch.logsumexp(scores, dim=-1))
    keep = torch.rand(2, 2, 17, 23) > 0.25
    out = ref.attention(q, k, v, attn_mask=amask, scale=0.2, dropout_p=0.25, dropout_keep=keep)
    exp = (torch.softmax(scores, -1) * keep / 0.75) @ v
    _same(out, exp)


def test_varlen_equals_per_sequence_calls():
    lens_q, lens_k = [3, 1, 9], [4, 6, 2]
    cu_q = torch.tensor([0, 3, 4, 13], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 10, 12], dtype=torch.int32)
    q = randn(13, 2, 8, dtype=torch.float64)
    k = randn(12, 1, 8, dtype=torch.float64)
    v = randn(12, 1, 8, dtype=torch.float64)
    out, lse = ref.attention_varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    assert lse.shape == (2, 13)
    for b in range(3):
        qs = slice(int(cu_q[b]), int(cu_q[b + 1]))
        ks = slice(int(cu_k[b]), int(cu_k[b + 1]))
        exp = F.scaled_dot_product_attention(q[qs].transpose(0, 1)[None], k[ks].transpose(0, 1)[None],
                                             v[ks].transpose(0, 1)[None], is_causal=True, enable_gqa=True)
        _same(out[qs], exp[0].transpose(0, 1))


# ---- the features of the models people run: each against its own first-principles form ----
def test_softcap_is_gemmas_formula():
    q, k, v = _qkv()
    s = torch.matmul(q, k.transpose(-2, -1)) * 0.25
    s = 5.0 * torch.tanh(s / 5.0)
    exp = torch.matmul(torch.softmax(s, -1), v)
    _same(ref.attention(q, k, v, scale=0.25, softcap=5.0), exp)
    _same(ref.attention(q, k, v, softcap=0.0), ref.attention(q, k, v))  # 0 = off (flash-attn)


@pytest.mark.parametrize("causal", [False, True])
def test_sinks_are_gpt_oss_concatenated_softmax(causal):
    """GPT-OSS: softmax over [scores, sink] with the sink column dropped afterwards."""
    q, k, v = _qkv(Hq=4, Hkv=2, Sq=9, Sk=9)
    sinks = randn(4, dtype=torch.float64, requires_grad=True)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = torch.matmul(q, kk.transpose(-2, -1)) / 4.0
    if causal:
        s = s.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
    cat = torch.cat([s, sinks.reshape(1, 4, 1, 1).expand(2, 4, 9, 1)], dim=-1)
    p = torch.softmax(cat, dim=-1)[..., :-1]
    exp = torch.matmul(p, vv)
    out, lse = ref.attention(q, k, v, causal=causal, sinks=sinks, return_lse=True)
    _same(out, exp)
    _same(lse, torch.logsumexp(cat, dim=-1))
    do = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v, sinks), do),
                    torch.autograd.grad(exp, (q, k, v, sinks), do)):
        _same(a, b)


def test_sinks_on_a_fully_masked_row_give_zero_and_lse_the_sink():
    q, k, v = _qkv(B=1, Hq=2, Hkv=2, Sq=3, Sk=4)
    sinks = torch.tensor([0.5, -1.0], dtype=torch.float64)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False
    out, lse = ref.attention(q, k, v, attn_mask=mask, sinks=sinks, return_lse=True)
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    assert torch.equal(lse[0, :, 1], sinks)


@pytest.mark.parametrize("Sq,Sk,bottom_right", [(7, 7, False), (5, 12, True), (5, 12, False)])
def test_alibi_is_its_additive_bias(Sq, Sk, bottom_right):
    """-slope * |i + off - j| (flash-attn's convention; off = Sk - Sq when bottom-right)."""
    q, k, v = _qkv(Sq=Sq, Sk=Sk)
    slopes = torch.rand(2, 4, dtype=torch.float64)
    off = Sk - Sq if bottom_right else 0
    dist = (torch.arange(Sq)[:, None] + off - torch.arange(Sk)[None, :]).abs().double()
    bias = -slopes[:, :, None, None] * dist
    _same(ref.attention(q, k, v, alibi_slopes=slopes, bottom_right=bottom_right),
          ref.attention(q, k, v, attn_mask=bias))
    _same(ref.attention(q, k, v, alibi_slopes=slopes[0], bottom_right=bottom_right),
          ref.attention(q, k, v, attn_mask=bias[0]))  # [Hq] slopes: one bias for every batch


@pytest.mark.parametrize("Sq,Sk", [(1, 9), (4, 9), (9, 9)])
def test_bottom_right_causal_is_a_kv_cache(Sq, Sk):
    """Sq new queries after Sk - Sq cached keys: query i sees keys j <= i + Sk - Sq, which is
    SDPA's mask tril(Sk - Sq) (torch's causal_lower_right)."""
    q, k, v = _qkv(Sq=Sq, Sk=Sk)
    tril = torch.ones(Sq, Sk, dtype=torch.bool).tril(Sk - Sq)
    _compare(q, k, v, {"causal": True, "bottom_right": True}, {"attn_mask": tril})
    # a window is aligned the same way
    win = tril & torch.ones(Sq, Sk, dtype=torch.bool).triu(Sk - Sq - 2)
    _compare(q, k, v, {"causal": True, "window": (2, 0), "bottom_right": True}, {"attn_mask": win})
