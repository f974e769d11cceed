"""fastbig's own CPU flash attention (csrc/attention/): registration glue and the ``auto`` rule.

- ``torch.ops.fastbig.attention_cpu_fwd`` / ``attention_cpu_bwd`` are C++ ops (schemas in
  csrc/registration.cpp). Here: their fake impls, the autograd formula (dq, dk, dv, the additive
  mask's gradient summed to the mask's own broadcast shape, the sinks' gradient
  dsink_h = -sum_{b,i} exp(sink_h - lse) * Delta), and ``run`` that ops/attention.py calls.
- ``use_ours``: the ``auto`` decision between this kernel and PyTorch's SDPA CPU kernel, from the
  measured table ``_WINS`` below (never a guess); ``FASTBIG_BACKEND=cpu`` does not force SDPA, it
  forces this kernel wherever it can take the inputs.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .. import _extension, backends

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available() -> bool:
    return _extension.has_op("attention_cpu_fwd") and _extension.has_op("attention_cpu_bwd")


if available():
    @torch.library.register_fake("fastbig::attention_cpu_fwd")
    def _fwd_fake(q, k, v, attn_mask, key_padding_mask, sinks, alibi_slopes, scale, softcap,
                  window_left, window_right, bottom_right):
        out = q.new_empty(q.shape)
        lse = q.new_empty(q.shape[:3], dtype=torch.float32)
        return out, lse

    @torch.library.register_fake("fastbig::attention_cpu_bwd")
    def _bwd_fake(grad_out, q, k, v, out, lse, attn_mask, key_padding_mask, sinks, alibi_slopes,
                  scale, softcap, window_left, window_right, bottom_right, mask_grad):
        mg = mask_grad and attn_mask is not None and attn_mask.dtype != torch.bool
        B, Hq, Sq, _ = q.shape
        dmask = q.new_empty((B, Hq, Sq, k.shape[2]) if mg else (0,), dtype=torch.float32)
        return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask,
                q.new_empty((B, Hq, Sq), dtype=torch.float32))

    def _setup(ctx, inputs, output):
        (q, k, v, attn_mask, kpm, sinks, alibi, scale, softcap, wl, wr, br) = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, attn_mask, kpm, sinks, alibi)
        ctx.args = (scale, softcap, wl, wr, br)
        ctx.mark_non_differentiable(lse)

    def _backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, attn_mask, kpm, sinks, alibi = ctx.saved_tensors
        scale, softcap, wl, wr, br = ctx.args
        none = (None,) * 12
        if grad_out is None:
            return none
        mask_grad = (attn_mask is not None and attn_mask.dtype != torch.bool
                     and ctx.needs_input_grad[3])
        dq, dk, dv, dmask, delta = torch.ops.fastbig.attention_cpu_bwd(
            grad_out, q, k, v, out, lse, attn_mask, kpm, sinks, alibi, scale, softcap, wl, wr, br,
            mask_grad)
        gmask = dmask.sum_to_size(attn_mask.shape).to(attn_mask.dtype) if mask_grad else None
        gsinks = None
        if sinks is not None and ctx.needs_input_grad[5]:
            w = torch.exp(sinks.float()[None, :, None] - lse) * delta
            gsinks = (-w.sum(dim=(0, 2))).to(sinks.dtype)
        return dq, dk, dv, gmask, None, gsinks, None, None, None, None, None, None

    torch.library.register_autograd("fastbig::attention_cpu_fwd", _backward, setup_context=_setup)


def supports(q, dropout_p) -> tuple[bool, str]:
    """Can this kernel take the call at all?"""
    if not available():
        return False, "fastbig._C has no attention_cpu op"
    if q.dtype not in _DTYPES:
        return False, f"the CPU kernel takes float32/bfloat16/float16, got {q.dtype}"
    if dropout_p > 0:
        return False, "the CPU kernel has no dropout"
    if q.numel() == 0:
        return False, "empty q"
    return True, ""


# ---- the measured `auto` table --------------------------------------------------------------
# (dtype, kind, grad) -> rows (max_threads, min_threads, lo, hi): ours wins for thread counts in
# [min_threads, max_threads] when lo <= work < hi, work = B*Hq*Sq*Sk*D / 1e6. kind: "decode"
# (Sq <= 8), "causal" (causal, no mask/padding/ALiBi), "causal_padded" (causal with a key padding
# mask and nothing else), "full" (anything else); grad: the call needs a backward. Anything not
# listed runs SDPA. Measured with bench/attention_cpu.py
# (--cases table and goals, ratio t(sdpa)/t(ours), median of 3-7 alternating reps) on 2 AVX2
# cores (AMD EPYC, no AVX-512) with other jobs running, at 1 and 2 threads only: thread counts
# above 2 are unmeasured and get SDPA. Sizes: work 8 (B2 H4 S128 D64), 537 (B4 H8 S512 D64),
# 4295 (B8 H8 S1024 D64), 8590 (B2 H8 S2048 D128); decode 0.13 (B1 H8 Sk256 D64), 17
# (B4 H32 Sk1024 D128), 67 (B1 H32 Sk16384 D128), 134 (B8 H32 Sk4096 D128). float16: unmeasured.
_INF = float("inf")
_WINS = {
    # fp32 causal forward: 1.01/1.23/0.90 at 1 thread, 0.33/0.97/1.09(4295)/0.91 at 2
    (torch.float32, "causal", False): [(1, 1, 100, 5000), (2, 2, 1000, 5000)],
    # fp32 causal fwd+bwd: 1.03/1.64/1.03 at 1 thread, 1.12/1.73/1.43/1.07 at 2
    (torch.float32, "causal", True): [(2, 1, 0, _INF)],
    # fp32 full forward: SDPA (0.82-0.88 at 1 thread, 0.33-0.85 at 2); full fwd+bwd 0.95/1.04/0.86
    # at 1 thread, 1.12/1.10/0.86 at 2
    (torch.float32, "full", True): [(2, 1, 100, 1000)],
    # fp32 decode: 0.70/1.41/1.70 at 1 thread, 0.50/0.75/1.31/1.56 at 2
    (torch.float32, "decode", False): [(1, 1, 10, _INF), (2, 2, 50, _INF)],
    (torch.float32, "decode", True): [(1, 1, 10, _INF), (2, 2, 50, _INF)],
    # bf16 causal forward: 1.14/1.46/1.10(4295)/0.87 at 1 thread, 0.25/0.84/1.08(4295)/0.98 at 2
    (torch.bfloat16, "causal", False): [(1, 1, 0, 5000), (2, 2, 1000, 5000)],
    # bf16 fwd+bwd, causal and full: 4.7x-10x at 1 and 2 threads (SDPA's bf16 backward is slow)
    (torch.bfloat16, "causal", True): [(2, 1, 0, _INF)],
    (torch.bfloat16, "full", True): [(2, 1, 0, _INF)],
    # causal with key padding (a padded batch's prefill), where SDPA takes a dense mask: measured
    # at work 34/537/1074/4295/8590, fwd fp32 1.3-1.6/1.4-1.6/1.9/1.7-2.0/1.7 at 1 thread and
    # 1.5-1.7/2.1-2.4/1.7/1.9-2.0/1.7-1.9 at 2; bf16 1.4/1.5-1.8/1.8/1.6-1.9/1.4-1.6 and
    # 1.3-1.5/1.5-2.0/1.6-1.9/1.8/1.7-1.9; fwd+bwd (work 34/537/4295) 1.3-2.4 at 1 and 2 threads,
    # both dtypes. SDPA does the whole Sq x Sk while ours skips the causal half, so the gap does
    # not close with size.
    (torch.float32, "causal_padded", False): [(2, 1, 30, _INF)],
    (torch.float32, "causal_padded", True): [(2, 1, 30, _INF)],
    (torch.bfloat16, "causal_padded", False): [(2, 1, 30, _INF)],
    (torch.bfloat16, "causal_padded", True): [(2, 1, 30, _INF)],
    # bf16 full forward: SDPA (1.00/0.83/0.83 at 1 thread, 0.25-0.84 at 2)
    # bf16 decode: 1.70/3.87/4.22 at 1 thread, 0.50/1.79/2.66/4.18 at 2
    (torch.bfloat16, "decode", False): [(1, 1, 0, _INF), (2, 2, 10, _INF)],
    (torch.bfloat16, "decode", True): [(1, 1, 0, _INF), (2, 2, 10, _INF)],
}


def _threads() -> int:
    return torch.get_num_threads()


# torch.compile: the thread count at trace time is baked into the graph (as the backend choice is)
_threads = torch.compiler.assume_constant_result(_threads)


def _kind(Sq, Sk, left, right, attn_mask, key_padding_mask, feats) -> str:
    if Sq <= 8:
        return "decode"
    causal = left < 0 and right == 0 and attn_mask is None and feats.alibi_slopes is None
    if causal and key_padding_mask is not None:
        return "causal_padded"  # SDPA gets a dense mask and loses its causal block skipping
    plain = key_padding_mask is None and (not feats.bottom_right or Sq == Sk)
    return "causal" if causal and plain else "full"


def use_ours(q, B, Sq, Sk, left, right, attn_mask, key_padding_mask, dropout_p, feats,
             kv=()) -> bool:
    """True when this kernel runs for a CPU call instead of SDPA: whenever it can take the inputs
    and either the backend is forced to ``cpu``, the call has softcap or sinks (SDPA has neither:
    the alternative is the reference), or the measured table ``_WINS`` says it is faster.
    kv: the call's k and v (a gradient for them alone makes the call a training call too)."""
    if q.device.type != "cpu":
        return False
    ok, _ = supports(q, dropout_p)
    if not ok or (feats.alibi_slopes is not None and feats.alibi_slopes.requires_grad):
        return False  # alibi slopes that need a gradient: the reference (SPEC)
    if backends.current() == "cpu" or feats.softcap > 0 or feats.sinks is not None:
        return True
    D = q.shape[-1]
    work = B * q.shape[1] * Sq * Sk * D / 1e6  # q: [B, Hq, Sq, D] or varlen [total, Hq, D]
    nt = _threads()
    kind = _kind(Sq, Sk, left, right, attn_mask, key_padding_mask, feats)
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, *kv, attn_mask, feats.sinks))
    for max_t, min_t, lo, hi in _WINS.get((q.dtype, kind, grad), ()):
        if min_t <= nt <= max_t and lo <= work < hi:
            return True
    return False


def run(q, k, v, left, right, attn_mask, key_padding_mask, scale, return_lse, feats):
    """The kernel through its custom op (differentiable in q, k, v, an additive attn_mask and
    sinks)."""
    alibi = feats.alibi_slopes.detach() if feats.alibi_slopes is not None else None
    out, lse = torch.ops.fastbig.attention_cpu_fwd(
        q, k, v, attn_mask, key_padding_mask, feats.sinks, alibi, float(scale),
        float(feats.softcap or 0.0), int(left), int(right), bool(feats.bottom_right))
    return (out, lse) if return_lse else out
