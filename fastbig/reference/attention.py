"""Attention oracle in plain torch: readable, differentiable, exact in float64.

    out = dropout(softmax(scale * Q K^T + mask)) V

Conventions (the same as fastbig's kernels):
- q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D], Hq % Hkv == 0 (GQA/MQA: query head h reads kv head
  h // (Hq // Hkv)).
- causal is top-left aligned, as SDPA's is_causal: query i sees keys j <= i.
- window = (left, right): query i sees keys i - left <= j <= i + right (None or a negative
  number = unbounded on that side); combined with causal, right becomes min(right, 0).
- attn_mask: bool (True = attend) or additive float, broadcastable to [B, Hq, Sq, Sk].
- key_padding_mask: bool [B, Sk], True = padded key (ignored), as nn.MultiheadAttention.
- dropout: given as an explicit keep mask (bool, broadcastable to [B, Hq, Sq, Sk]) and p;
  kept probabilities are scaled by 1 / (1 - p).
- A fully masked query row gives output 0 (and gradient 0) and log-sum-exp -inf.

Features of the models people run, per score s_ij, in this order:
- softcap (Gemma 2/3, Grok): s = softcap * tanh(s / softcap), s = scale * q.k; None/0 = off.
- alibi_slopes (BLOOM, MPT, Falcon): fp32 [Hq] or [B, Hq]; s -= slope * |i + off - j|.
- the additive attn_mask, then -inf where masked.
- bottom_right: causal and window are aligned to the bottom-right corner, off = Sk - Sq
  (query i stands at key position i + Sk - Sq: a KV cache, chunked prefill); else off = 0.
- sinks (GPT-OSS): a learned per-head logit [Hq] that joins the softmax denominator,
  p_ij = exp(s_ij) / (exp(sink_h) + sum_j exp(s_ij)); it carries no value. The log-sum-exp
  includes it; a fully masked row gives output 0 and lse = sink_h.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


def allowed_positions(Sq: int, Sk: int, *, causal: bool = False, window=None, device=None,
                      bottom_right: bool = False):
    """Bool [Sq, Sk]: True where query i may attend key j under causal/window, else None.
    bottom_right: query i stands at key position i + Sk - Sq (else i)."""
    left, right = _window_bounds(causal, window)
    if left is None and right is None:
        return None
    i = torch.arange(Sq, device=device)[:, None] + (Sk - Sq if bottom_right else 0)
    j = torch.arange(Sk, device=device)[None, :]
    ok = torch.ones(Sq, Sk, dtype=torch.bool, device=device)
    if left is not None:
        ok &= j >= i - left
    if right is not None:
        ok &= j <= i + right
    return ok


def _window_bounds(causal: bool, window) -> Tuple[Optional[int], Optional[int]]:
    left = right = None
    if window is not None:
        left, right = window
        left = None if left is None or left < 0 else int(left)
        right = None if right is None or right < 0 else int(right)
    if causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def alibi_bias(slopes, Sq: int, Sk: int, *, bottom_right: bool = False):
    """-slope * |i + off - j| as [B|1, Hq, Sq, Sk] from slopes [Hq] or [B, Hq]."""
    off = Sk - Sq if bottom_right else 0
    i = torch.arange(Sq, device=slopes.device)[:, None] + off
    j = torch.arange(Sk, device=slopes.device)[None, :]
    dist = (i - j).abs().to(slopes.dtype)
    s = slopes if slopes.dim() == 2 else slopes[None]
    return -s[:, :, None, None] * dist


def attention(q, k, v, *, causal=False, window=None, attn_mask=None, key_padding_mask=None,
              dropout_p=0.0, dropout_keep=None, scale=None, return_lse=False,
              return_weights=False, softcap=None, sinks=None, alibi_slopes=None,
              bottom_right=False):
    """The definition of correct. Returns out (and lse [B, Hq, Sq], and/or the weights)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    if group > 1:  # GQA: each kv head serves `group` consecutive query heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale

    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # [B, Hq, Sq, Sk]
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes.to(scores.dtype), Sq, Sk, bottom_right=bottom_right)
    allowed = torch.ones(B, Hq, Sq, Sk, dtype=torch.bool, device=q.device)
    pos = allowed_positions(Sq, Sk, causal=causal, window=window, device=q.device,
                            bottom_right=bottom_right)
    if pos is not None:
        allowed = allowed & pos
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask.bool()[:, None, None, :]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            scores = scores + attn_mask.to(scores.dtype)
    scores = scores.masked_fill(~allowed, float("-inf"))

    # Softmax that gives 0 (not NaN) on rows where every key is masked.
    if Sk == 0:  # no keys at all: every row is fully masked
        row_max = scores.new_zeros(B, Hq, Sq, 1)
    else:
        row_max = scores.amax(dim=-1, keepdim=True)
    sink = None
    if sinks is not None:  # a per-head logit in the denominator: [1, Hq, 1, 1]
        sink = sinks.to(scores.dtype).reshape(1, Hq, 1, 1).expand(B, Hq, Sq, 1)
        row_max = torch.maximum(row_max, sink)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    e = torch.exp(scores - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    if sink is not None:
        denom = denom + torch.exp(sink - row_max)
    probs = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    lse = (torch.log(denom) + row_max).squeeze(-1)  # -inf on fully masked rows

    weights = probs
    if dropout_p > 0.0:
        if dropout_keep is None:
            raise ValueError("reference attention: dropout_p > 0 needs an explicit dropout_keep mask")
        weights = probs * dropout_keep.to(probs.dtype) / (1.0 - dropout_p)
    out = torch.matmul(weights, v)
    result = (out,)
    if return_lse:
        result += (lse.float() if q.dtype in (torch.float16, torch.bfloat16) else lse,)
    if return_weights:
        result += (probs,)
    return result[0] if len(result) == 1 else result


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, window=None,
                     dropout_p=0.0, dropout_keep=None, scale=None, return_lse=False,
                     softcap=None, sinks=None, alibi_slopes=None, bottom_right=False):
    """Packed sequences as flash_attn_varlen_func: q [total_q, H, D], k/v [total_k, Hkv, D].

    Sequence b is rows cu_seqlens_q[b]:cu_seqlens_q[b+1] of q (and likewise of k, v). Returns
    out [total_q, H, D] (and lse [H, total_q]). dropout_keep, if given, is a list of per-sequence
    keep masks [H, Sq_b, Sk_b]. alibi_slopes: [H] or [B, H]; bottom_right aligns each
    sequence on its own (off = Sk_b - Sq_b).
    """
    cq = [int(x) for x in cu_seqlens_q.tolist()]
    ck = [int(x) for x in cu_seqlens_k.tolist()]
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qb = q[cq[b]:cq[b + 1]].transpose(0, 1)[None]
        kb = k[ck[b]:ck[b + 1]].transpose(0, 1)[None]
        vb = v[ck[b]:ck[b + 1]].transpose(0, 1)[None]
        keep = None if dropout_keep is None else dropout_keep[b][None]
        slopes = alibi_slopes
        if slopes is not None and slopes.dim() == 2:
            slopes = slopes[b]
        o, lse = attention(qb, kb, vb, causal=causal, window=window, dropout_p=dropout_p,
                           dropout_keep=keep, scale=scale, return_lse=True, softcap=softcap,
                           sinks=sinks, alibi_slopes=slopes, bottom_right=bottom_right)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    out = torch.cat(outs, dim=0)
    if return_lse:
        return out, torch.cat(lses, dim=1)
    return out
