"""Flash attention (FlashAttention-2 style) in Triton: forward, backward, and their launchers.

Forward: one program per (batch*query-head, BLOCK_M query rows); online softmax in the log2
domain with fp32 accumulators; stores out and the log-sum-exp (natural log, fp32).
Decoding (Sq <= SPLITK_MAX_SQ rows, Sk >= SPLITK_MIN_SK keys): a split-K forward instead, one
program per (batch, GQA group's heads, key split) writing fp32 partials, merged by log-sum-exp.
Backward: Delta = rowsum(O * dO) (preprocess kernel), then dK/dV (one program per kv head and key
block, looping over the query heads of its GQA group and the query blocks) and dQ (one program
per query head and query block, looping over key blocks); a broadcast additive mask's gradient
by its own reduction kernel. No atomics: bit-for-bit deterministic.

Batch*heads is on grid axis 0 everywhere (CUDA caps axes 1 and 2 at 65535), launches run under
the inputs' device, and every offset that multiplies a stride is int64.

Features (constexpr flags, off = the kernels compile as without them; SPEC in notes): logit
softcap, attention sinks (lse includes them; dsinks from the preprocess kernel), ALiBi slopes
[Hq] or [B, Hq], bottom_right alignment of causal/window (diagonal shifted by Sk - Sq, per
sequence in varlen; tile skipping follows the shifted band).

Everything a caller can vary is read in place through strides: q/k/v/o of any strides, GQA/MQA
(kv head = h // GROUP), key padding [B, Sk] (True = padded), bool or additive masks broadcast to
[B, Hq, Sq, Sk] by stride 0, varlen batches (cu_seqlens), causal (top-left) and sliding windows
(loop bounds skip tiles that are fully outside the window), dropout from a Philox seed
(regenerated in the backward), head dims 16..256 padded in registers to BLOCK_D.

Under TRITON_INTERPRET=1 (CPU tensors) one small config is used and fp32 dots are "ieee"; on a
GPU the kernels are autotuned (A100/H100 configs) and fp32 dots use tf32.

This module imports triton at import time; fastbig.ops imports it lazily.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_HEAD_DIM = 256

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")
# The interpreter's block size: small enough that odd sizes cross several tiles in the tests.
_INTERP_BLOCK_M = 32
_INTERP_BLOCK_N = 32
# Tests set this: every buffer a kernel must fully write starts as NaN, so a missed element shows.
POISON_OUTPUTS = False


def _empty_like(t, **kw):
    out = torch.empty_like(t, memory_format=torch.contiguous_format, **kw)
    if POISON_OUTPUTS and out.is_floating_point():
        out.fill_(float("nan"))
    return out


# ---------------------------------------------------------------------------------------------
# Shared device helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _dropout_keep(seed, bh, offs_m, offs_n, drop_stride, dropout_p):
    """Keep-mask of one [BLOCK_M, BLOCK_N] tile: Philox keyed by (seed, batch*head), counter
    m * drop_stride + n. The forward, both backward kernels and dropout_mask() agree on it."""
    # (no seed.to(): an int argument equal to 1 arrives as a constexpr on GPUs)
    key = (bh.to(tl.int64) << 32) + seed
    offs = offs_m[:, None] * drop_stride + offs_n[None, :]
    return tl.rand(key, offs) >= dropout_p


@triton.jit
def _score_tile(q, k, pos_m, m_ok, offs_n, k_len, diag, qk_scale2, cap2, slope2,
                Mask, mrow, smn, kp_base, skpn, window_left, window_right,
                HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_KPM: tl.constexpr,
                HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                HAS_ALIBI: tl.constexpr, DOT_PREC: tl.constexpr):
    """Scores of one tile in the log2 domain, -inf where masked, and the softcap's tanh (the
    backward's chain factor 1 - t^2; the raw dot product when there is no softcap).

    Per score, in the order of the spec: s = scale * q.k; softcap * tanh(s / softcap); minus
    slope * |i + diag - j| (ALiBi); plus the additive mask. pos_m: the rows' positions i in their
    sequence; diag: Sk - Sq when bottom_right, else 0 (causal/window: i + diag - l <= j <= i +
    diag + r). Without softcap qk_scale2 = scale * log2(e); with it qk_scale2 = scale / softcap and
    cap2 = softcap * log2(e). slope2 = slope * log2(e), a scalar or a [BLOCK_M, 1] column.
    mrow: the rows' mask offsets (b * smb + h * smh + i * smm, int64)."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if HAS_SOFTCAP:
        # tanh(x) = 1 - 2 / (exp(2x) + 1): exact at both tails (exp2 -> inf gives 1, -> 0 gives -1)
        e2x = tl.exp2((qk * qk_scale2) * 2.8853900817779268)
        t = 1.0 - 2.0 / (e2x + 1.0)
        s = t * cap2
    else:
        t = qk
        s = qk * qk_scale2
    offs_n64 = offs_n.to(tl.int64)
    rel = (pos_m + diag)[:, None] - offs_n[None, :]  # i + off - j
    valid = (offs_n < k_len)[None, :] & m_ok[:, None]
    if HAS_WL:
        valid = valid & (rel <= window_left)
    if HAS_WR:
        valid = valid & (rel >= -window_right)
    if HAS_ALIBI:
        s = s - slope2 * tl.abs(rel).to(tl.float32)
    if HAS_KPM:
        kp = tl.load(kp_base + offs_n64 * skpn, mask=offs_n < k_len, other=1)
        valid = valid & (kp == 0)[None, :]
    if HAS_MASK:
        mptr = Mask + mrow[:, None] + offs_n64[None, :] * smn
        inb = m_ok[:, None] & (offs_n < k_len)[None, :]
        if MASK_BOOL:
            mv = tl.load(mptr, mask=inb, other=0)
            valid = valid & (mv != 0)
        else:
            mv = tl.load(mptr, mask=inb, other=0.0).to(tl.float32)
            s = s + mv * 1.4426950408889634
    return tl.where(valid, s, float("-inf")), t


@triton.jit
def _seq_bounds(CuQ, CuK, b, SQ, SK, IS_VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr):
    """(q_start, q_len, k_start, k_len, diag) of sequence b; diag = k_len - q_len if bottom_right."""
    if IS_VARLEN:
        q_start = tl.load(CuQ + b)
        q_len = tl.load(CuQ + b + 1) - q_start
        k_start = tl.load(CuK + b)
        k_len = tl.load(CuK + b + 1) - k_start
    else:
        q_start = 0
        q_len = SQ
        k_start = 0
        k_len = SK
    if BOTTOM_RIGHT:
        diag = k_len - q_len
    else:
        diag = 0
    return q_start, q_len, k_start, k_len, diag


@triton.jit
def _alibi_slope2(Alibi, b64, h, sab, sah, HAS_ALIBI: tl.constexpr):
    if HAS_ALIBI:
        slope2 = tl.load(Alibi + b64 * sab + h.to(tl.int64) * sah).to(tl.float32) * 1.4426950408889634
    else:
        slope2 = 0.0
    return slope2


@triton.jit
def _load_tile(base, offs_r64, stride_r, offs_d, stride_d, mask):
    """A [rows, BLOCK_D] tile at base + r * stride_r + d * stride_d, zeros outside mask."""
    return tl.load(base + offs_r64[:, None] * stride_r + offs_d[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def _key_band(start_m, k_len, diag, window_left, window_right,
              HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi): the keys that query rows start_m .. start_m + BLOCK_M - 1 can see under the
    causal/window band (the band's diagonal shifted by diag); lo rounded down to a key tile."""
    lo = 0
    hi = k_len
    if HAS_WL:
        lo = tl.maximum(start_m + diag - window_left, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    if HAS_WR:
        hi = tl.minimum(hi, start_m + BLOCK_M + diag + window_right)
    return lo, hi


@triton.jit
def _online_softmax(s, m_i, l_i, acc):
    """One key tile of the online softmax (log2 domain): the tile's unnormalized P, the new running
    max, and the running sum and output accumulator rescaled to it."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked so far: no NaN
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    return p, m_new, l_i, acc


@triton.jit
def _normalize(acc, m_i, l_i):
    """The rows' output acc / l and log2-sum-exp; a row that saw no key gives 0 and -inf."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    return acc / l_safe[:, None], tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))


@triton.jit
def _row_stats(Lse, Delta, offs, m_ok):
    """The backward's per-row lse in the log2 domain (+inf for a row that saw no key, so its P is
    0) and Delta = rowsum(dO * O), at Lse + offs and Delta + offs."""
    lse = tl.load(Lse + offs, mask=m_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(Delta + offs, mask=m_ok, other=0.0)
    return lse2, delta


@triton.jit
def _probs_and_dp(s, lse2, do, v, seed, bh, offs_m, offs_n, drop_stride, dropout_p, drop_scale,
                  HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    """A recomputed tile's P = exp2(s - lse2), the P the forward multiplied V by (after dropout)
    and dP = dO V^T (after dropout): what dS = P * (dP - Delta) and dV = P^T dO need."""
    p = tl.exp2(s - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, bh, offs_m, offs_n, drop_stride, dropout_p)
        pd = tl.where(keep, p * drop_scale, 0.0)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    else:
        pd = p
    return p, pd, dp


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, Mask, Kpm, CuQ, CuK, Sinks, Alibi,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    slb, slh, slm, smb, smh, smm, smn, skpb, skpn, ssh, sab, sah,
    H, GROUP, SQ, SK, D, qk_scale2, cap2, window_left, window_right, dropout_p, drop_scale, seed,
    drop_stride, SQ_CLASS, SK_CLASS,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_KPM: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
    HAS_ALIBI: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    b = bh // H
    h = bh % H
    hk = h // GROUP
    q_start, q_len, k_start, k_len, diag = _seq_bounds(CuQ, CuK, b, SQ, SK, IS_VARLEN, BOTTOM_RIGHT)
    if start_m >= q_len:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < q_len

    q_ptrs = (Q + b64 * sqb + h64 * sqh + (q_start + offs_m).to(tl.int64)[:, None] * sqm
              + offs_d[None, :] * sqd)
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b64 * skb + hk.to(tl.int64) * skh + k_start.to(tl.int64) * skn
    v_base = V + b64 * svb + hk.to(tl.int64) * svh + k_start.to(tl.int64) * svn
    mrow = b64 * smb + h64 * smh + offs_m.to(tl.int64) * smm
    kp_base = Kpm + b64 * skpb
    slope2 = _alibi_slope2(Alibi, b64, h, sab, sah, HAS_ALIBI)

    if HAS_SINKS:  # the sink is a key with logit sink_h and no value: it starts the running sums
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + (
            tl.load(Sinks + h64 * ssh).to(tl.float32) * 1.4426950408889634)
        l_i = tl.where(m_i == float("-inf"), 0.0, 1.0)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Key range this query block can see: skip tiles outside the causal/window band.
    lo, hi = _key_band(start_m, k_len, diag, window_left, window_right, HAS_WL, HAS_WR,
                       BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        offs_n64 = offs_n.to(tl.int64)
        kv_mask = (offs_n < k_len)[:, None] & d_ok[None, :]
        k = _load_tile(k_base, offs_n64, skn, offs_d, skd, kv_mask)
        s, _t = _score_tile(q, k, offs_m, m_ok, offs_n, k_len, diag, qk_scale2, cap2, slope2,
                            Mask, mrow, smn, kp_base, skpn, window_left, window_right,
                            HAS_MASK, MASK_BOOL, HAS_KPM, HAS_WL, HAS_WR, HAS_SOFTCAP, HAS_ALIBI,
                            DOT_PREC)
        p, m_i, l_i, acc = _online_softmax(s, m_i, l_i, acc)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, offs_n, drop_stride, dropout_p)
            p = tl.where(keep, p, 0.0)
        v = _load_tile(v_base, offs_n64, svn, offs_d, svd, kv_mask)
        acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)

    out, lse2 = _normalize(acc, m_i, l_i)
    if HAS_DROPOUT:
        out = out * drop_scale
    lse = lse2 * 0.6931471805599453
    o_ptrs = (Out + b64 * sob + h64 * soh + (q_start + offs_m).to(tl.int64)[:, None] * som
              + offs_d[None, :] * sod)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    l_ptrs = Lse + b64 * slb + h64 * slh + (q_start + offs_m).to(tl.int64) * slm
    tl.store(l_ptrs, lse, mask=m_ok)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_preprocess_kernel(
    Out, DO, Delta, CuQ, Lse, Sinks, DSinkPart,
    sob, soh, som, sod, sdb, sdh, sdm, sdd, slb, slh, slm, ssh,
    H, SQ, D,
    IS_VARLEN: tl.constexpr, HAS_SINKS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Delta[b, h, m] = sum_d O[b, h, m, d] * dO[b, h, m, d] in fp32; with sinks also this
    block's part of dsink_h = -sum_{b, i} exp(sink_h - lse_bhi) * Delta_bhi, written to
    DSinkPart[bh, block] (the launcher sums the parts: deterministic, no atomics)."""
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    start_m = pid_m * BLOCK_M
    b = bh // H
    h = bh % H
    if IS_VARLEN:
        q_start = tl.load(CuQ + b)
        q_len = tl.load(CuQ + b + 1) - q_start
    else:
        q_start = 0
        q_len = SQ
    if start_m >= q_len:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = (q_start + offs_m).to(tl.int64)
    m_ok = offs_m < q_len
    msk = m_ok[:, None] & (offs_d < D)[None, :]
    o = tl.load(Out + b64 * sob + h64 * soh + rows[:, None] * som + offs_d[None, :] * sod,
                mask=msk, other=0.0).to(tl.float32)
    do = tl.load(DO + b64 * sdb + h64 * sdh + rows[:, None] * sdm + offs_d[None, :] * sdd,
                 mask=msk, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    tl.store(Delta + b64 * slb + h64 * slh + rows * slm, delta, mask=m_ok)
    if HAS_SINKS:
        sink = tl.load(Sinks + h64 * ssh).to(tl.float32)
        lse = tl.load(Lse + b64 * slb + h64 * slh + rows * slm, mask=m_ok, other=float("-inf"))
        w = tl.where(lse == float("-inf"), 0.0, tl.exp(sink - lse))
        tl.store(DSinkPart + bh.to(tl.int64) * tl.num_programs(1) + pid_m, -tl.sum(w * delta, 0))


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, Mask, Kpm, CuQ, CuK, Alibi,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    slb, slh, slm, smb, smh, smm, smn, skpb, skpn, sab, sah,
    H, HKV, GROUP, SQ, SK, D, qk_scale2, cap2, scale, window_left, window_right, dropout_p,
    drop_scale, seed, drop_stride, SQ_CLASS, SK_CLASS,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_KPM: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bhk = tl.program_id(0)
    start_n = tl.program_id(1) * BLOCK_N
    b = bhk // HKV
    hk = bhk % HKV
    q_start, q_len, k_start, k_len, diag = _seq_bounds(CuQ, CuK, b, SQ, SK, IS_VARLEN, BOTTOM_RIGHT)
    if start_n >= k_len:
        return
    b64 = b.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_mask = (offs_n < k_len)[:, None] & d_ok[None, :]
    krows = (k_start + offs_n).to(tl.int64)
    hk64 = hk.to(tl.int64)
    k = _load_tile(K + b64 * skb + hk64 * skh, krows, skn, offs_d, skd, kv_mask)
    v = _load_tile(V + b64 * svb + hk64 * svh, krows, svn, offs_d, svd, kv_mask)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    kp_base = Kpm + b64 * skpb

    # Query range that can see this key block (the band's diagonal shifted by diag).
    lo = 0
    hi = q_len
    if HAS_WR:
        lo = tl.maximum(start_n - diag - window_right, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    if HAS_WL:
        hi = tl.minimum(hi, start_n + BLOCK_N - diag + window_left)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        h64 = h.to(tl.int64)
        bh = b * H + h
        q_base = Q + b64 * sqb + h64 * sqh + q_start.to(tl.int64) * sqm
        do_base = DO + b64 * sdb + h64 * sdh + q_start.to(tl.int64) * sdm
        l_base = Lse + b64 * slb + h64 * slh + q_start.to(tl.int64) * slm
        d_base = Delta + b64 * slb + h64 * slh + q_start.to(tl.int64) * slm
        slope2 = _alibi_slope2(Alibi, b64, h, sab, sah, HAS_ALIBI)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            offs_m64 = offs_m.to(tl.int64)
            m_ok = offs_m < q_len
            qmask = m_ok[:, None] & d_ok[None, :]
            q = _load_tile(q_base, offs_m64, sqm, offs_d, sqd, qmask)
            do = _load_tile(do_base, offs_m64, sdm, offs_d, sdd, qmask)
            lse2, delta = _row_stats(l_base, d_base, offs_m64 * slm, m_ok)
            mrow = b64 * smb + h64 * smh + offs_m64 * smm
            s, t = _score_tile(q, k, offs_m, m_ok, offs_n, k_len, diag, qk_scale2, cap2, slope2,
                               Mask, mrow, smn, kp_base, skpn, window_left, window_right,
                               HAS_MASK, MASK_BOOL, HAS_KPM, HAS_WL, HAS_WR, HAS_SOFTCAP,
                               HAS_ALIBI, DOT_PREC)
            p, pd, dp = _probs_and_dp(s, lse2, do, v, seed, bh, offs_m, offs_n, drop_stride,
                                      dropout_p, drop_scale, HAS_DROPOUT, DOT_PREC)
            dv += tl.dot(tl.trans(pd.to(do.dtype)), do, input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            if HAS_SOFTCAP:
                ds = ds * (1.0 - t * t)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
    dk = dk * scale
    tl.store(DK + b64 * sdkb + hk64 * sdkh + krows[:, None] * sdkn + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b64 * sdvb + hk64 * sdvh + krows[:, None] * sdvn + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, DMask, Mask, Kpm, CuQ, CuK, Alibi,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
    sdqb, sdqh, sdqm, sdqd, sgb, sgh, sgm, sgn,
    slb, slh, slm, smb, smh, smm, smn, skpb, skpn, sab, sah,
    H, GROUP, SQ, SK, D, qk_scale2, cap2, scale, window_left, window_right, dropout_p, drop_scale,
    seed, drop_stride, SQ_CLASS, SK_CLASS,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_KPM: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr, STORE_DMASK: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    b = bh // H
    h = bh % H
    hk = h // GROUP
    q_start, q_len, k_start, k_len, diag = _seq_bounds(CuQ, CuK, b, SQ, SK, IS_VARLEN, BOTTOM_RIGHT)
    if start_m >= q_len:
        return
    b64 = b.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < q_len
    qmask = m_ok[:, None] & d_ok[None, :]
    rows = (q_start + offs_m).to(tl.int64)
    h64 = h.to(tl.int64)
    q = _load_tile(Q + b64 * sqb + h64 * sqh, rows, sqm, offs_d, sqd, qmask)
    do = _load_tile(DO + b64 * sdb + h64 * sdh, rows, sdm, offs_d, sdd, qmask)
    lse2, delta = _row_stats(Lse, Delta, b64 * slb + h64 * slh + rows * slm, m_ok)
    k_base = K + b64 * skb + hk.to(tl.int64) * skh + k_start.to(tl.int64) * skn
    v_base = V + b64 * svb + hk.to(tl.int64) * svh + k_start.to(tl.int64) * svn
    mrow = b64 * smb + h64 * smh + offs_m.to(tl.int64) * smm
    kp_base = Kpm + b64 * skpb
    slope2 = _alibi_slope2(Alibi, b64, h, sab, sah, HAS_ALIBI)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, hi = _key_band(start_m, k_len, diag, window_left, window_right, HAS_WL, HAS_WR,
                       BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        offs_n64 = offs_n.to(tl.int64)
        kv_mask = (offs_n < k_len)[:, None] & d_ok[None, :]
        k = _load_tile(k_base, offs_n64, skn, offs_d, skd, kv_mask)
        v = _load_tile(v_base, offs_n64, svn, offs_d, svd, kv_mask)
        s, t = _score_tile(q, k, offs_m, m_ok, offs_n, k_len, diag, qk_scale2, cap2, slope2,
                           Mask, mrow, smn, kp_base, skpn, window_left, window_right,
                           HAS_MASK, MASK_BOOL, HAS_KPM, HAS_WL, HAS_WR, HAS_SOFTCAP, HAS_ALIBI,
                           DOT_PREC)
        p, _pd, dp = _probs_and_dp(s, lse2, do, v, seed, bh, offs_m, offs_n, drop_stride,
                                   dropout_p, drop_scale, HAS_DROPOUT, DOT_PREC)
        ds = p * (dp - delta[:, None])
        if STORE_DMASK:  # d(loss)/d(additive mask) = dS, written once per (b, h, m, n)
            gptr = (DMask + b64 * sgb + h64 * sgh + offs_m.to(tl.int64)[:, None] * sgm
                    + offs_n64[None, :] * sgn)
            tl.store(gptr, ds, mask=m_ok[:, None] & (offs_n < k_len)[None, :])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    dq = dq * scale
    tl.store(DQ + b64 * sdqb + h64 * sdqh + rows[:, None] * sdqm + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=qmask)


@triton.jit
def _attn_bwd_dmask_kernel(
    Q, K, V, DO, Lse, Delta, DMask, Mask, Kpm, Alibi,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
    sgb, sgh, sgm, sgn, slb, slh, slm, smb, smh, smm, smn, skpb, skpn, sab, sah,
    H, GROUP, SQ, SK, D, qk_scale2, cap2, window_left, window_right, dropout_p, drop_scale,
    seed, drop_stride, SQ_CLASS, SK_CLASS, MH, B_LOOP, H_LOOP,
    HAS_KPM: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr, RED_M: tl.constexpr, RED_N: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """d(loss)/d(additive mask) summed to the mask's own broadcast shape [MB, MH, MQ, MK], with no
    full [B, H, Sq, Sk] buffer and no atomics: one program per element tile of the mask gradient
    (axis 0: the mask's (b, h) pairs, axis 1: its row blocks, axis 2: its column blocks) loops over
    the batches/heads/rows/columns that broadcast onto it (B_LOOP/H_LOOP > 1, RED_M/RED_N),
    recomputing dS = P * (dP - Delta) tile by tile, and sums in a fixed order (deterministic).
    The mask enters after softcap and ALiBi, so its gradient is dS without the softcap factor."""
    pid = tl.program_id(0)
    bm = pid // MH
    hm = pid % MH
    m_lo = tl.program_id(1) * BLOCK_M
    n_lo = tl.program_id(2) * BLOCK_N
    if RED_M:
        m_hi = SQ
    else:
        m_hi = tl.minimum(m_lo + BLOCK_M, SQ)
    if RED_N:
        n_hi = SK
    else:
        n_hi = tl.minimum(n_lo + BLOCK_N, SK)
    if BOTTOM_RIGHT:
        diag = SK - SQ
    else:
        diag = 0
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for bi in range(0, B_LOOP):
        b64 = (bm + bi).to(tl.int64)
        kp_base = Kpm + b64 * skpb
        for hi_ in range(0, H_LOOP):
            h = hm + hi_
            h64 = h.to(tl.int64)
            hk64 = (h // GROUP).to(tl.int64)
            bh = (bm + bi) * H + h
            slope2 = _alibi_slope2(Alibi, b64, h, sab, sah, HAS_ALIBI)
            for start_m in range(m_lo, m_hi, BLOCK_M):
                offs_m = start_m + offs_m0
                offs_m64 = offs_m.to(tl.int64)
                m_ok = offs_m < SQ
                qmask = m_ok[:, None] & d_ok[None, :]
                q = _load_tile(Q + b64 * sqb + h64 * sqh, offs_m64, sqm, offs_d, sqd, qmask)
                do = _load_tile(DO + b64 * sdb + h64 * sdh, offs_m64, sdm, offs_d, sdd, qmask)
                lse2, delta = _row_stats(Lse, Delta, b64 * slb + h64 * slh + offs_m64 * slm, m_ok)
                mrow = b64 * smb + h64 * smh + offs_m64 * smm
                for start_n in range(n_lo, n_hi, BLOCK_N):
                    offs_n = start_n + offs_n0
                    offs_n64 = offs_n.to(tl.int64)
                    kv_mask = (offs_n < SK)[:, None] & d_ok[None, :]
                    k = _load_tile(K + b64 * skb + hk64 * skh, offs_n64, skn, offs_d, skd, kv_mask)
                    v = _load_tile(V + b64 * svb + hk64 * svh, offs_n64, svn, offs_d, svd, kv_mask)
                    s, _t = _score_tile(q, k, offs_m, m_ok, offs_n, SK, diag, qk_scale2, cap2,
                                        slope2, Mask, mrow, smn, kp_base, skpn, window_left,
                                        window_right, True, False, HAS_KPM, HAS_WL, HAS_WR,
                                        HAS_SOFTCAP, HAS_ALIBI, DOT_PREC)
                    p, _pd, dp = _probs_and_dp(s, lse2, do, v, seed, bh, offs_m, offs_n,
                                               drop_stride, dropout_p, drop_scale, HAS_DROPOUT,
                                               DOT_PREC)
                    acc += p * (dp - delta[:, None])
    gbase = DMask + bm.to(tl.int64) * sgb + hm.to(tl.int64) * sgh
    rows = (m_lo + offs_m0).to(tl.int64)
    cols = (n_lo + offs_n0).to(tl.int64)
    if RED_M:
        accm = tl.sum(acc, 0)
        if RED_N:
            tl.store(gbase, tl.sum(accm, 0))
        else:
            tl.store(gbase + cols * sgn, accm, mask=cols < SK)
    else:
        if RED_N:
            tl.store(gbase + rows * sgm, tl.sum(acc, 1), mask=rows < SQ)
        else:
            tl.store(gbase + rows[:, None] * sgm + cols[None, :] * sgn, acc,
                     mask=(rows < SQ)[:, None] & (cols < SK)[None, :])


@triton.jit
def _dropout_mask_kernel(Keep, H, SQ, SK, seed, drop_stride, dropout_p,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes the keep-mask the attention kernels use for (seed, p) into Keep [B*H, SQ, SK]."""
    bh = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, bh, offs_m, offs_n, drop_stride, dropout_p)
    ptr = Keep + bh.to(tl.int64) * SQ * SK + offs_m.to(tl.int64)[:, None] * SK + offs_n[None, :]
    tl.store(ptr, keep.to(tl.int8), mask=(offs_m < SQ)[:, None] & (offs_n < SK)[None, :])


# ---------------------------------------------------------------------------------------------
# Decoding: split-K forward (flash-decoding)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_splitk_kernel(
    Q, K, V, OPart, LPart, Mask, Kpm, CuQ, CuK, Alibi,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    smb, smh, smm, smn, skpb, skpn, sab, sah,
    H, GROUP, HPP, SQ, SK, D, NUM_SPLITS, qk_scale2, cap2, window_left, window_right, SK_CLASS,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_KPM: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (batch, HPP query heads of one GQA group, key split): its rows are the
    HPP heads' Sq query rows (row r: head h0 + r // SQ, position r % SQ), so the group's K/V
    split is read once for all of them. Writes the split's normalized partial output and its
    log2-sum-exp (fp32; -inf and 0 for a split that sees no key) for the merge kernel."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_chunks = H // HPP
    b = pid // n_chunks
    h0 = (pid % n_chunks) * HPP
    hk = h0 // GROUP
    q_start, q_len, k_start, k_len, diag = _seq_bounds(CuQ, CuK, b, SQ, SK, IS_VARLEN, BOTTOM_RIGHT)
    b64 = b.to(tl.int64)
    r = tl.arange(0, BLOCK_M)
    pos_m = r % SQ
    h = h0 + r // SQ
    h64 = h.to(tl.int64)
    m_ok = (r < HPP * SQ) & (pos_m < q_len)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + b64 * sqb + h64[:, None] * sqh + (q_start + pos_m).to(tl.int64)[:, None] * sqm
                + offs_d[None, :] * sqd, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b64 * skb + hk.to(tl.int64) * skh + k_start.to(tl.int64) * skn
    v_base = V + b64 * svb + hk.to(tl.int64) * svh + k_start.to(tl.int64) * svn
    mrow = b64 * smb + h64 * smh + pos_m.to(tl.int64) * smm
    kp_base = Kpm + b64 * skpb
    if HAS_ALIBI:
        slope2 = (tl.load(Alibi + b64 * sab + h64 * sah, mask=m_ok, other=0.0).to(tl.float32)
                  * 1.4426950408889634)[:, None]
    else:
        slope2 = 0.0

    # This split's keys, cut to the causal/window band of all its rows (positions 0..q_len-1).
    chunk = tl.cdiv(tl.cdiv(k_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, k_len)
    if HAS_WL:
        lo = tl.maximum(lo, (tl.maximum(diag - window_left, 0) // BLOCK_N) * BLOCK_N)
    if HAS_WR:
        hi = tl.minimum(hi, q_len + diag + window_right)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        offs_n64 = offs_n.to(tl.int64)
        kv_mask = (offs_n < hi)[:, None] & d_ok[None, :]
        k = _load_tile(k_base, offs_n64, skn, offs_d, skd, kv_mask)
        s, _t = _score_tile(q, k, pos_m, m_ok, offs_n, hi, diag, qk_scale2, cap2, slope2,
                            Mask, mrow, smn, kp_base, skpn, window_left, window_right,
                            HAS_MASK, MASK_BOOL, HAS_KPM, HAS_WL, HAS_WR, HAS_SOFTCAP, HAS_ALIBI,
                            DOT_PREC)
        p, m_i, l_i, acc = _online_softmax(s, m_i, l_i, acc)
        v = _load_tile(v_base, offs_n64, svn, offs_d, svd, kv_mask)
        acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)

    out, lse2 = _normalize(acc, m_i, l_i)
    # partials [B, H, SQ, NUM_SPLITS, (D)], fp32
    prow = ((b64 * H + h64) * SQ + pos_m.to(tl.int64)) * NUM_SPLITS + split
    tl.store(OPart + prow[:, None] * D + offs_d[None, :], out, mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LPart + prow, lse2, mask=m_ok)


@triton.jit
def _attn_splitk_merge_kernel(
    OPart, LPart, Out, Lse, CuQ, Sinks,
    sob, soh, som, sod, slb, slh, slm, ssh,
    H, SQ, D, NUM_SPLITS,
    IS_VARLEN: tl.constexpr, HAS_SINKS: tl.constexpr, SPLITS_P2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out = sum_s exp(lse_s - lse) out_s with lse = log(exp(sink) + sum_s exp(lse_s)): the splits'
    partials merged by log-sum-exp, the sink added once, here."""
    bh = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    b = bh // H
    h = bh % H
    if IS_VARLEN:
        q_start = tl.load(CuQ + b)
        q_len = tl.load(CuQ + b + 1) - q_start
    else:
        q_start = 0
        q_len = SQ
    if start_m >= q_len:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < q_len
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    prow = (bh.to(tl.int64) * SQ + offs_m.to(tl.int64)) * NUM_SPLITS
    lp = tl.load(LPart + prow[:, None] + offs_s[None, :],
                 mask=m_ok[:, None] & (offs_s < NUM_SPLITS)[None, :], other=float("-inf"))
    m = tl.max(lp, 1)
    if HAS_SINKS:
        sink2 = tl.load(Sinks + h.to(tl.int64) * ssh).to(tl.float32) * 1.4426950408889634
        m = tl.maximum(m, sink2)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    tot = tl.sum(tl.exp2(lp - m_safe[:, None]), 1)
    if HAS_SINKS:
        tot += tl.exp2(sink2 - m_safe)
    empty = tot == 0.0
    lse2 = tl.where(empty, float("inf"), m_safe + tl.log2(tl.where(empty, 1.0, tot)))
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(0, NUM_SPLITS):
        ls = tl.load(LPart + prow + s, mask=m_ok, other=float("-inf"))
        o = tl.load(OPart + (prow + s)[:, None] * D + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.exp2(ls - lse2)[:, None] * o
    rows = (q_start + offs_m).to(tl.int64)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    tl.store(Out + b64 * sob + h64 * soh + rows[:, None] * som + offs_d[None, :] * sod,
             acc.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(Lse + b64 * slb + h64 * slh + rows * slm,
             tl.where(empty, float("-inf"), lse2 * 0.6931471805599453), mask=m_ok)


# ---------------------------------------------------------------------------------------------
# Autotuning (GPU only; the interpreter runs one config)
# ---------------------------------------------------------------------------------------------
def _fwd_configs():
    cfgs = []
    # Big tiles for fp16/bf16 at D <= 128; the small ones are what fits fp32 or D = 256 in shared
    # memory (checked by compiling for sm_90: fp32 D=256 (64, 32, 4, 1) needs 96 KiB).
    for bm, bn, w, s in [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4),
                         (128, 32, 4, 4), (64, 32, 4, 3), (64, 32, 4, 1), (32, 32, 4, 2)]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s))
    return cfgs


def _bwd_configs():
    cfgs = []
    for bm, bn, w, s in [(64, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (32, 64, 4, 3),
                         (64, 32, 4, 3), (32, 32, 4, 2), (32, 32, 4, 1)]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s))
    return cfgs


def _prune(configs, named_args, **kwargs):
    """Drop tiles whose register/shared footprint is hopeless for wide heads (configs that still
    exceed shared memory fail to launch and the autotuner skips them)."""
    bd = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    if bd <= 64:
        return configs
    limit = 128 * 64 if bd <= 128 else 64 * 64
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= limit]
    return kept or configs[-1:]


def _len_class(n: int) -> int:
    """The autotune key's view of a sequence length: tiny (<= 16: decoding rows), short (<= 512),
    long. A decode loop whose cache grows from 1 to 100k keys re-tunes at most three times (a
    power-of-two bucket re-tuned at every doubling). The values are multiples of 16 and never 1,
    so that Triton's integer specialization gives them all one compiled kernel."""
    n = int(n)
    return 16 if n <= 16 else (512 if n <= 512 else 4096)


# Everything else that changes the best tile is in the key too: head dim, GQA group, the feature
# flags (the autotuner adds the tensors' dtypes itself).
_KEY = ["BLOCK_D", "SQ_CLASS", "SK_CLASS", "GROUP", "HAS_MASK", "HAS_KPM", "IS_VARLEN",
        "HAS_WL", "HAS_WR", "HAS_DROPOUT", "HAS_SOFTCAP", "HAS_ALIBI", "BOTTOM_RIGHT"]


def _autotune_kwargs() -> dict:
    """cache_results=True keeps the tuning results on disk (in Triton's cache dir) across
    processes; both Triton 3.6 and 3.8 take it, older ones do not (checked by signature)."""
    import inspect
    kw = {}
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        kw["cache_results"] = True
    return kw


def _autotune(configs, key, kernel):
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": _prune},
                           **_autotune_kwargs())(kernel)


if INTERPRET:
    _fwd_launch = _attn_fwd_kernel
    _dkdv_launch = _attn_bwd_dkdv_kernel
    _dq_launch = _attn_bwd_dq_kernel
    _dmask_launch = _attn_bwd_dmask_kernel
else:  # pragma: no cover - needs a GPU
    _fwd_launch = _autotune(_fwd_configs(), _KEY + ["HAS_SINKS"], _attn_fwd_kernel)
    _dkdv_launch = _autotune(_bwd_configs(), _KEY, _attn_bwd_dkdv_kernel)
    _dq_launch = _autotune(_bwd_configs(), _KEY + ["STORE_DMASK"], _attn_bwd_dq_kernel)
    _dmask_launch = _autotune(_bwd_configs(), ["BLOCK_D", "SQ_CLASS", "SK_CLASS", "GROUP", "HAS_KPM",
                                               "HAS_WL", "HAS_WR", "HAS_DROPOUT", "HAS_SOFTCAP",
                                               "HAS_ALIBI", "BOTTOM_RIGHT", "RED_M", "RED_N"],
                              _attn_bwd_dmask_kernel)


def _splitk_configs():
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bn, w, st in [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 3), (32, 4, 3)]]


def _splitk_prune(configs, named_args, **kwargs):
    bd = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    kept = [c for c in configs if bd <= 128 or c.kwargs["BLOCK_N"] <= 64]
    return kept or configs[-1:]


if INTERPRET:
    _splitk_launch = _attn_fwd_splitk_kernel
else:  # pragma: no cover - needs a GPU
    _splitk_launch = triton.autotune(
        _splitk_configs(), key=["BLOCK_D", "BLOCK_M", "SK_CLASS", "GROUP", "HAS_MASK", "HAS_KPM",
                                "IS_VARLEN", "HAS_WL", "HAS_WR", "HAS_SOFTCAP", "HAS_ALIBI",
                                "BOTTOM_RIGHT"],
        prune_configs_by={"early_config_prune": _splitk_prune}, **_autotune_kwargs(),
    )(_attn_fwd_splitk_kernel)


def _blocks(fixed: bool):
    return {"BLOCK_M": _INTERP_BLOCK_M, "BLOCK_N": _INTERP_BLOCK_N} if fixed else {}


@contextlib.contextmanager
def interpreter_blocks(block_m: int, block_n: int):
    """Under TRITON_INTERPRET=1, run the kernels with BLOCK_M x BLOCK_N tiles (powers of two >= 16)
    instead of the default 32 x 32: tests draw square and non-square tiles, as the GPU autotuner
    picks (128 x 64, 64 x 128, ...), and tiles small against the sequence so that it crosses
    several. On a GPU the autotuner decides and this does nothing."""
    global _INTERP_BLOCK_M, _INTERP_BLOCK_N
    for name, b in (("block_m", block_m), ("block_n", block_n)):
        if not (isinstance(b, int) and b >= 16 and b & (b - 1) == 0):
            raise ValueError(f"interpreter_blocks: {name} must be a power of two >= 16, got {b!r}")
    old = _INTERP_BLOCK_M, _INTERP_BLOCK_N
    _INTERP_BLOCK_M, _INTERP_BLOCK_N = block_m, block_n
    try:
        yield
    finally:
        _INTERP_BLOCK_M, _INTERP_BLOCK_N = old


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _grid(bh: int, n: int, block: str):
    """Grid of a (batch*heads, row or column blocks) kernel: batch*heads on axis 0, which CUDA
    allows up to 2**31 - 1, the blocks on axis 1 (capped at 65535, i.e. 2M rows at 32-row tiles).
    B*H on axis 1, as it was, failed to launch past 65535 (e.g. B=4096, H=16 at decode)."""
    return lambda META: (bh, triton.cdiv(n, META[block]))


def _on_device(t):
    """Launch on t's device, not the current one (as the C++ ops' device guard does): Triton
    launches on the current CUDA device, so a tensor on cuda:1 with cuda:0 current would run on
    the wrong device (illegal address). A no-op on CPU (the interpreter)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _dot_prec(dtype) -> str:
    return "tf32" if (dtype == torch.float32 and not INTERPRET) else "ieee"


class _Layout:
    """Batch/head/row strides of a [B, H, S, D] tensor or a packed varlen [T, H, D] one."""

    def __init__(self, t, varlen):
        if varlen:
            self.strides = (0, t.stride(1), t.stride(0), t.stride(2))
        else:
            self.strides = tuple(t.stride())


def _lse_strides(lse, varlen):
    # batched lse [B, H, Sq]; varlen lse [H, total_q]
    return (0, lse.stride(0), lse.stride(1)) if varlen else tuple(lse.stride())


def _mask_args(attn_mask, B, H, Sq, Sk, q):
    """(pointer, strides, has, is_bool): masks broadcast to [B, H, Sq, Sk] by stride 0."""
    if attn_mask is None:
        return q, (0, 0, 0, 0), False, False
    m = attn_mask.expand(B, H, Sq, Sk)
    is_bool = m.dtype == torch.bool
    if is_bool:
        m = m.view(torch.uint8)
    return m, tuple(m.stride()), True, is_bool


def _kpm_args(key_padding_mask, q):
    if key_padding_mask is None:
        return q, (0, 0), False
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask.dtype == torch.bool else key_padding_mask
    return kpm, tuple(kpm.stride()), True


def _window_args(window_left, window_right):
    has_wl = window_left is not None and window_left >= 0
    has_wr = window_right is not None and window_right >= 0
    return (int(window_left) if has_wl else 0, int(window_right) if has_wr else 0, has_wl, has_wr)


def _dims(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    varlen = cu_seqlens_q is not None
    if varlen:
        B = cu_seqlens_q.numel() - 1
        H, D = q.shape[1], q.shape[2]
        Hkv = k.shape[1]
        Sq, Sk = int(max_seqlen_q), int(max_seqlen_k)
    else:
        B, H, Sq, D = q.shape
        Hkv, Sk = k.shape[1], k.shape[2]
    return varlen, B, H, Hkv, Sq, Sk, D


class _FeatureArgs:
    """The kernels' view of softcap / sinks / ALiBi / bottom_right: pointers, strides, the score
    scales and the constexpr flags (all off: the kernels compile as without them)."""

    def __init__(self, q, scale, softcap, sinks, alibi_slopes, bottom_right):
        self.softcap = float(softcap or 0.0)
        if self.softcap > 0:
            self.qk_scale2, self.cap2 = scale / self.softcap, self.softcap * LOG2E
        else:
            self.qk_scale2, self.cap2 = scale * LOG2E, 1.0
        self.sinks = q if sinks is None else sinks
        self.ssh = 0 if sinks is None else sinks.stride(0)
        self.alibi = q if alibi_slopes is None else alibi_slopes
        if alibi_slopes is None:
            self.sab = self.sah = 0
        elif alibi_slopes.dim() == 1:
            self.sab, self.sah = 0, alibi_slopes.stride(0)
        else:
            self.sab, self.sah = alibi_slopes.stride(0), alibi_slopes.stride(1)
        self.has_sinks = sinks is not None
        self.flags = dict(HAS_SOFTCAP=self.softcap > 0, HAS_ALIBI=alibi_slopes is not None,
                          BOTTOM_RIGHT=bool(bottom_right))


# Split-K decoding (flash-decoding) is taken for Sq <= SPLITK_MAX_SQ query rows against
# Sk >= SPLITK_MIN_SK keys (max_seqlen_q/k in varlen), without dropout. There the normal forward
# runs one program per (batch, head) that walks all of Sk alone (B*H programs, e.g. 32 for a
# batch-1 decode of a 32-head model, on 132 SMs) and reads each GQA group's K/V once per query
# head; split-K runs (batch, GQA group) x num_splits programs. 1024 keys: below it the whole K/V
# of a head is at most 16 tiles of 64 keys (a few microseconds), where the second launch and the
# fp32 partials cost about what the splitting gains (to be re-measured on the GPU machine; this
# session had none). Tests lower the thresholds and force SPLITK_NUM_SPLITS.
SPLITK_MAX_SQ = 16
SPLITK_MIN_SK = 1024
SPLITK_NUM_SPLITS = None  # None: chosen from B*H and Sk (see _splitk_plan)
SPLITK_MAX_ROWS = 64      # query rows (heads x positions) one split program packs
_NUM_SMS = {}


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 132  # H100/H200, for the interpreter's plan
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def _splitk_plan(B, H, Hkv, Sq, Sk, device, dropout_p=0.0):
    """(heads per program, num_splits, BLOCK_M) for the split-K forward, or None for the normal
    one. Heads per program: the largest divisor of the GQA group whose rows fit SPLITK_MAX_ROWS.
    num_splits: enough programs for two waves of the device's SMs, each split at least 256 keys,
    at most 64 splits."""
    if not (1 <= Sq <= SPLITK_MAX_SQ and Sk >= SPLITK_MIN_SK and dropout_p == 0.0):
        return None
    group = H // Hkv
    hpp = max(d for d in range(1, group + 1) if group % d == 0 and d * Sq <= max(SPLITK_MAX_ROWS, Sq))
    base = B * (H // hpp)
    if SPLITK_NUM_SPLITS is not None:
        splits = int(SPLITK_NUM_SPLITS)
    else:
        splits = max(1, min(triton.cdiv(2 * _num_sms(device), base), triton.cdiv(Sk, 256), 64))
    return hpp, splits, max(16, triton.next_power_of_2(hpp * Sq))


def _splitk_forward(q, k, v, out, lse, plan, *, varlen, B, H, Hkv, Sq, Sk, D, mask, mstr, has_mask,
                    mask_bool, kpm, kstr, has_kpm, wl, wr, has_wl, has_wr, cuq, cuk, ft):
    hpp, splits, block_m = plan
    opart = torch.empty(B, H, Sq, splits, D, dtype=torch.float32, device=q.device)
    lpart = torch.empty(B, H, Sq, splits, dtype=torch.float32, device=q.device)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    _splitk_launch[(B * (H // hpp), splits)](
        q, k, v, opart, lpart, mask, kpm, cuq, cuk, ft.alibi,
        *_Layout(q, varlen).strides, *_Layout(k, varlen).strides, *_Layout(v, varlen).strides,
        *mstr, *kstr, ft.sab, ft.sah,
        H, H // Hkv, hpp, Sq, Sk, D, splits, ft.qk_scale2, ft.cap2, wl, wr, _len_class(Sk),
        HAS_MASK=has_mask, MASK_BOOL=mask_bool, HAS_KPM=has_kpm, IS_VARLEN=varlen,
        HAS_WL=has_wl, HAS_WR=has_wr, DOT_PREC=_dot_prec(q.dtype), BLOCK_M=block_m,
        BLOCK_D=BLOCK_D, **ft.flags, **({"BLOCK_N": _INTERP_BLOCK_N} if INTERPRET else {}))
    _attn_splitk_merge_kernel[(B * H, triton.cdiv(Sq, 16))](
        opart, lpart, out, lse, cuq, ft.sinks, *_Layout(out, varlen).strides,
        *_lse_strides(lse, varlen), ft.ssh, H, Sq, D, splits,
        IS_VARLEN=varlen, HAS_SINKS=ft.has_sinks, SPLITS_P2=triton.next_power_of_2(splits),
        BLOCK_M=16, BLOCK_D=BLOCK_D)


def attention_forward(q, k, v, *, attn_mask=None, key_padding_mask=None, cu_seqlens_q=None,
                      cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, scale, window_left=-1,
                      window_right=-1, dropout_p=0.0, seed=0, softcap=0.0, sinks=None,
                      alibi_slopes=None, bottom_right=False):
    """Runs the forward kernel. Returns (out like q, lse fp32 [B, H, Sq] or [H, total_q]).
    softcap (0 = off), sinks [Hq] (any float dtype), alibi_slopes fp32 [Hq] or [B, Hq] and
    bottom_right (causal/window diagonal at Sk - Sq, per sequence in varlen) as in SPEC.md; the
    lse includes the sink."""
    varlen, B, H, Hkv, Sq, Sk, D = _dims(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    ft = _FeatureArgs(q, scale, softcap, sinks, alibi_slopes, bottom_right)
    out = _empty_like(q)
    if varlen:
        lse = _empty_like(q.new_empty(H, q.shape[0], dtype=torch.float32))
    else:
        lse = _empty_like(q.new_empty(B, H, Sq, dtype=torch.float32))
    if out.numel() == 0:
        if lse.numel() and sinks is not None:  # no keys: every row's lse is its head's sink
            lse.copy_(sinks.float()[:, None].expand(H, lse.shape[-1]).expand_as(lse))
        else:
            lse.fill_(float("-inf"))
        return out, lse
    mask, mstr, has_mask, mask_bool = _mask_args(attn_mask, B, H, Sq, Sk, q)
    kpm, kstr, has_kpm = _kpm_args(key_padding_mask, q)
    wl, wr, has_wl, has_wr = _window_args(window_left, window_right)
    cuq = cu_seqlens_q if varlen else q
    cuk = cu_seqlens_k if varlen else q
    has_drop = dropout_p > 0.0
    plan = _splitk_plan(B, H, Hkv, Sq, Sk, q.device, dropout_p)
    if plan is not None:
        with _on_device(q):
            _splitk_forward(q, k, v, out, lse, plan, varlen=varlen, B=B, H=H, Hkv=Hkv, Sq=Sq,
                            Sk=Sk, D=D, mask=mask, mstr=mstr, has_mask=has_mask, mask_bool=mask_bool,
                            kpm=kpm, kstr=kstr, has_kpm=has_kpm, wl=wl, wr=wr, has_wl=has_wl,
                            has_wr=has_wr, cuq=cuq, cuk=cuk, ft=ft)
        return out, lse
    with _on_device(q):
        _fwd_launch[_grid(B * H, Sq, "BLOCK_M")](
            q, k, v, out, lse, mask, kpm, cuq, cuk, ft.sinks, ft.alibi,
            *_Layout(q, varlen).strides, *_Layout(k, varlen).strides, *_Layout(v, varlen).strides,
            *_Layout(out, varlen).strides, *_lse_strides(lse, varlen), *mstr, *kstr, ft.ssh, ft.sab,
            ft.sah, H, H // Hkv, Sq, Sk, D, ft.qk_scale2, ft.cap2, wl, wr, float(dropout_p),
            1.0 / (1.0 - dropout_p) if has_drop else 1.0, int(seed), Sk, _len_class(Sq),
            _len_class(Sk),
            HAS_MASK=has_mask, MASK_BOOL=mask_bool, HAS_KPM=has_kpm, IS_VARLEN=varlen,
            HAS_WL=has_wl, HAS_WR=has_wr, HAS_DROPOUT=has_drop, HAS_SINKS=ft.has_sinks,
            DOT_PREC=_dot_prec(q.dtype), BLOCK_D=max(16, triton.next_power_of_2(D)),
            **ft.flags, **_blocks(INTERPRET),
        )
    return out, lse


def _mask_grad_shape(attn_mask, B, H, Sq, Sk):
    """The mask's own shape as 4-D [MB, MH, MQ, MK] and which of the four dims broadcast (size 1
    against a full size > 1), i.e. are summed over in its gradient."""
    shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    red = tuple(m == 1 and f > 1 for m, f in zip(shape, (B, H, Sq, Sk)))
    return shape, red


def attention_backward(grad_out, q, k, v, out, lse, *, attn_mask=None, key_padding_mask=None,
                       cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, scale,
                       window_left=-1, window_right=-1, dropout_p=0.0, seed=0, mask_grad=False,
                       softcap=0.0, sinks=None, alibi_slopes=None, bottom_right=False):
    """Runs the backward kernels. Returns (dq, dk, dv, dmask-or-None, dsinks-or-None); dsinks
    fp32 [Hq] when sinks are given (whether or not they require grad). dmask is asked for with
    mask_grad (an additive mask that requires grad) and comes in the mask's own shape, fp32:
    a full-shape mask's gradient is written by the dQ kernel as it goes; a broadcast one (e.g.
    [Sq, Sk], [B, 1, 1, Sk]) by a reduction kernel into that shape, never through a full
    [B, H, Sq, Sk] buffer. No mask gradient asked for: nothing is allocated."""
    varlen, B, H, Hkv, Sq, Sk, D = _dims(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    ft = _FeatureArgs(q, scale, softcap, sinks, alibi_slopes, bottom_right)
    dq, dk, dv = _empty_like(q), _empty_like(k), _empty_like(v)
    want_dmask = bool(mask_grad and attn_mask is not None and attn_mask.dtype != torch.bool)
    dmask, red = None, (False,) * 4
    if want_dmask:
        gshape, red = _mask_grad_shape(attn_mask, B, H, Sq, Sk)
        if any(red):  # the reduction kernel writes every element
            dmask = _empty_like(q.new_empty(gshape, dtype=torch.float32))
        else:  # the dQ kernel skips tiles outside the causal/window band: they stay 0
            dmask = torch.zeros(gshape, dtype=torch.float32, device=q.device)
    store_dmask = want_dmask and not any(red)
    dmask_out = None if dmask is None else dmask.view(attn_mask.shape)
    if q.numel() == 0 or k.numel() == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        if dmask is not None:
            dmask.zero_()
        # no rows, or no keys (out = 0, so Delta = O.dO = 0 and dsink = -sum exp(.) Delta = 0)
        dsinks = None if sinks is None else torch.zeros(H, dtype=torch.float32, device=q.device)
        return dq, dk, dv, dmask_out, dsinks
    delta = _empty_like(lse)
    mask, mstr, has_mask, mask_bool = _mask_args(attn_mask, B, H, Sq, Sk, q)
    kpm, kstr, has_kpm = _kpm_args(key_padding_mask, q)
    wl, wr, has_wl, has_wr = _window_args(window_left, window_right)
    cuq = cu_seqlens_q if varlen else q
    cuk = cu_seqlens_k if varlen else q
    has_drop = dropout_p > 0.0
    drop_scale = 1.0 / (1.0 - dropout_p) if has_drop else 1.0
    BLOCK_D = max(16, triton.next_power_of_2(D))
    lstr = _lse_strides(lse, varlen)
    ql, kl, vl = _Layout(q, varlen).strides, _Layout(k, varlen).strides, _Layout(v, varlen).strides
    dol = _Layout(grad_out, varlen).strides
    pre_bm = 64 if BLOCK_D <= 128 else 32
    common = dict(HAS_MASK=has_mask, MASK_BOOL=mask_bool, HAS_KPM=has_kpm, IS_VARLEN=varlen,
                  HAS_WL=has_wl, HAS_WR=has_wr, HAS_DROPOUT=has_drop,
                  DOT_PREC=_dot_prec(q.dtype), BLOCK_D=BLOCK_D, **ft.flags, **_blocks(INTERPRET))
    pre_grid = _grid(B * H, Sq, "BLOCK_M")({"BLOCK_M": pre_bm})
    dsink_part = torch.zeros(pre_grid, dtype=torch.float32, device=q.device) if ft.has_sinks else lse
    with _on_device(q):
        _attn_bwd_preprocess_kernel[pre_grid](
            out, grad_out, delta, cuq, lse, ft.sinks, dsink_part, *_Layout(out, varlen).strides,
            *dol, *lstr, ft.ssh, H, Sq, D,
            IS_VARLEN=varlen, HAS_SINKS=ft.has_sinks, BLOCK_M=pre_bm, BLOCK_D=BLOCK_D)
        _dkdv_launch[_grid(B * Hkv, Sk, "BLOCK_N")](
            q, k, v, grad_out, lse, delta, dk, dv, mask, kpm, cuq, cuk, ft.alibi,
            *ql, *kl, *vl, *dol, *_Layout(dk, varlen).strides, *_Layout(dv, varlen).strides,
            *lstr, *mstr, *kstr, ft.sab, ft.sah,
            H, Hkv, H // Hkv, Sq, Sk, D, ft.qk_scale2, ft.cap2, scale, wl, wr, float(dropout_p),
            drop_scale,
            int(seed), Sk, _len_class(Sq), _len_class(Sk), **common)
        gbuf = dmask if store_dmask else q
        gstr = tuple(dmask.stride()) if store_dmask else (0, 0, 0, 0)
        _dq_launch[_grid(B * H, Sq, "BLOCK_M")](
            q, k, v, grad_out, lse, delta, dq, gbuf, mask, kpm, cuq, cuk, ft.alibi,
            *ql, *kl, *vl, *dol, *_Layout(dq, varlen).strides, *gstr, *lstr, *mstr, *kstr,
            ft.sab, ft.sah,
            H, H // Hkv, Sq, Sk, D, ft.qk_scale2, ft.cap2, scale, wl, wr, float(dropout_p), drop_scale,
            int(seed), Sk, _len_class(Sq), _len_class(Sk), STORE_DMASK=store_dmask, **common)
        if want_dmask and any(red):
            MB, MH = gshape[0], gshape[1]
            red_b, red_h, red_m, red_n = red
            grid = lambda META: (MB * MH, 1 if red_m else triton.cdiv(Sq, META["BLOCK_M"]),  # noqa: E731
                                 1 if red_n else triton.cdiv(Sk, META["BLOCK_N"]))
            _dmask_launch[grid](
                q, k, v, grad_out, lse, delta, dmask, mask, kpm, ft.alibi,
                *ql, *kl, *vl, *dol, *dmask.stride(), *lstr, *mstr, *kstr, ft.sab, ft.sah,
                H, H // Hkv, Sq, Sk, D, ft.qk_scale2, ft.cap2, wl, wr, float(dropout_p), drop_scale,
                int(seed), Sk, _len_class(Sq), _len_class(Sk), MH, B if red_b else 1,
                H if red_h else 1,
                HAS_KPM=has_kpm, HAS_WL=has_wl, HAS_WR=has_wr,
                HAS_DROPOUT=has_drop, RED_M=red_m, RED_N=red_n, DOT_PREC=_dot_prec(q.dtype),
                BLOCK_D=BLOCK_D, **ft.flags, **_blocks(INTERPRET))
    dsinks = dsink_part.view(B, H, -1).sum((0, 2)) if ft.has_sinks else None
    return dq, dk, dv, dmask_out, dsinks


def dropout_mask(B, H, Sq, Sk, dropout_p, seed, device, drop_stride=None):
    """The keep-mask (bool [B, H, Sq, Sk]) the kernels apply for (seed, p): for tests and
    for recomputing a dropout run with the reference."""
    keep = torch.empty(B * H, Sq, Sk, dtype=torch.int8, device=device)
    grid = (B * H, triton.cdiv(Sq, 32), triton.cdiv(Sk, 32))
    with _on_device(keep):
        _dropout_mask_kernel[grid](keep, H, Sq, Sk, int(seed), Sk if drop_stride is None else drop_stride,
                                   float(dropout_p), BLOCK_M=32, BLOCK_N=32)
    return keep.view(B, H, Sq, Sk).bool()
