"""The attention op, whole life in one file: input checks, dispatch, custom-op registration of
the Triton kernels (fake impls + autograd), and the CPU path.

    attention(q, k, v, *, causal, window, attn_mask, key_padding_mask, dropout_p, scale,
              return_lse, softcap, sinks, alibi_slopes, bottom_right) -> out [, lse]
    attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)

Backends (fastbig.backends):
- ``triton``: the flash kernels of fastbig/kernels/attention.py, through the custom ops
  ``fastbig::flash_attn`` / ``fastbig::flash_attn_backward``. They are ``torch.library.custom_op``s
  wrapping the launch, not ``triton_op``s: a triton_op runs eagerly under TRITON_INTERPRET=1 on CPU
  tensors, but torch.compile then calls the kernel with fake tensors and fails ("Cannot access data
  pointer of Tensor"), so the CPU CI could not trace it. A custom_op is opaque to the compiler
  and traces with no graph break on both CPU (interpreter) and GPU.
- ``cpu``: PyTorch's own SDPA CPU kernel (F.scaled_dot_product_attention, or the flash-for-CPU aten
  op when the log-sum-exp is asked for). ``auto`` on CPU tensors picks it.
- ``reference``: fastbig/reference/attention.py.

Conventions are the reference's: causal top-left (SDPA), window (left, right) with None/-1 =
unbounded, bool attn_mask True = attend, key_padding_mask True = padded key, fully masked rows
give 0. The log-sum-exp is returned for inspection only (not differentiable). The features of
the models people run (softcap, sinks, ALiBi, bottom-right alignment) are defined there too.
"""
from __future__ import annotations

import math
import numbers
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import backends
from ..reference import attention as ref
from . import _attention_cpu
from ._checks import check_same, check_tensor

_OP = "attention"
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256


def _kernels():
    from ..kernels import attention as kern  # imported lazily: triton may be missing
    return kern


# ---- the custom ops over the Triton kernels -------------------------------------------------
@torch.library.custom_op("fastbig::flash_attn", mutates_args=())
def _flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                max_seqlen_q: int, max_seqlen_k: int, scale: float, window_left: int,
                window_right: int, dropout_p: float, seed: Optional[torch.Tensor],
                softcap: float = 0.0, sinks: Optional[torch.Tensor] = None,
                alibi_slopes: Optional[torch.Tensor] = None, bottom_right: bool = False
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    return _kernels().attention_forward(
        q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, scale=scale, window_left=window_left, window_right=window_right,
        dropout_p=dropout_p, seed=0 if seed is None else int(seed.item()), softcap=softcap,
        sinks=sinks, alibi_slopes=alibi_slopes, bottom_right=bottom_right)


@_flash_attn.register_fake
def _flash_attn_fake(q, k, v, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                     max_seqlen_q, max_seqlen_k, scale, window_left, window_right, dropout_p, seed,
                     softcap=0.0, sinks=None, alibi_slopes=None, bottom_right=False):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if cu_seqlens_q is not None:
        lse = q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)
    else:
        lse = q.new_empty(q.shape[0], q.shape[1], q.shape[2], dtype=torch.float32)
    return out, lse


@torch.library.custom_op("fastbig::flash_attn_backward", mutates_args=())
def _flash_attn_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         out: torch.Tensor, lse: torch.Tensor, attn_mask: Optional[torch.Tensor],
                         key_padding_mask: Optional[torch.Tensor],
                         cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                         max_seqlen_q: int, max_seqlen_k: int, scale: float, window_left: int,
                         window_right: int, dropout_p: float, seed: Optional[torch.Tensor],
                         mask_grad: bool, softcap: float = 0.0, sinks: Optional[torch.Tensor] = None,
                         alibi_slopes: Optional[torch.Tensor] = None, bottom_right: bool = False
                         ) -> List[torch.Tensor]:
    dq, dk, dv, dmask, dsinks = _kernels().attention_backward(
        grad_out, q, k, v, out, lse, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, scale=scale, window_left=window_left, window_right=window_right,
        dropout_p=dropout_p, seed=0 if seed is None else int(seed.item()), mask_grad=mask_grad,
        softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes, bottom_right=bottom_right)
    # dmask comes in the mask's own shape (summed over its broadcast dims by the kernels)
    dmask = q.new_empty(0, dtype=torch.float32) if dmask is None else dmask
    dsinks = q.new_empty(0, dtype=torch.float32) if dsinks is None else dsinks
    return [dq, dk, dv, dmask, dsinks]


@_flash_attn_backward.register_fake
def _flash_attn_backward_fake(grad_out, q, k, v, out, lse, attn_mask, key_padding_mask,
                              cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                              window_left, window_right, dropout_p, seed, mask_grad, softcap=0.0,
                              sinks=None, alibi_slopes=None, bottom_right=False):
    mg = mask_grad and attn_mask is not None and attn_mask.dtype != torch.bool
    dmask = q.new_empty(attn_mask.shape if mg else (0,), dtype=torch.float32)
    dsinks = q.new_empty((q.shape[1],) if sinks is not None else (0,), dtype=torch.float32)
    return [torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format), dmask, dsinks]


def _flash_setup(ctx, inputs, output):
    (q, k, v, attn_mask, kpm, cuq, cuk, msq, msk, scale, wl, wr, p, seed,
     softcap, sinks, alibi, bottom_right) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, kpm, cuq, cuk, seed, sinks, alibi)
    ctx.args = (msq, msk, scale, wl, wr, p, softcap, bottom_right)
    ctx.mark_non_differentiable(lse)


def _flash_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, attn_mask, kpm, cuq, cuk, seed, sinks, alibi = ctx.saved_tensors
    msq, msk, scale, wl, wr, p, softcap, bottom_right = ctx.args
    if grad_out is None:
        return (None,) * 18
    mask_grad = attn_mask is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dmask, dsinks = _flash_attn_backward(
        grad_out, q, k, v, out, lse, attn_mask, kpm, cuq, cuk, msq, msk, scale, wl, wr, p, seed,
        mask_grad, softcap, sinks, alibi, bottom_right)
    dmask = dmask.to(attn_mask.dtype) if mask_grad else None
    dsinks = dsinks.to(sinks.dtype) if sinks is not None and ctx.needs_input_grad[15] else None
    # alibi_slopes get no gradient here: slopes that require grad take the reference (ops gate)
    return (dq, dk, dv, dmask) + (None,) * 11 + (dsinks, None, None)


_flash_attn.register_autograd(_flash_backward, setup_context=_flash_setup)


# ---- input checks ---------------------------------------------------------------------------
def _window(causal, window, op=_OP) -> Tuple[int, int]:
    """(left, right) as ints, -1 = unbounded; causal folds into right <= 0."""
    left = right = -1
    if window is not None:
        if not (isinstance(window, (tuple, list)) and len(window) == 2):
            raise ValueError(f"{op}: window must be a (left, right) pair of ints or None, got {window!r}")
        vals = []
        for name, w in zip(("left", "right"), window):
            if w is None:
                vals.append(-1)
            elif isinstance(w, numbers.Integral) and not isinstance(w, bool):
                vals.append(int(w) if w >= 0 else -1)
            else:
                raise TypeError(f"{op}: window {name} must be an int or None, got {type(w).__name__}")
        left, right = vals
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool, got {type(causal).__name__}")
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def _check_common(op, q, dropout_p, scale, return_lse):
    if not isinstance(dropout_p, numbers.Real) or not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"{op}: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if scale is not None and not isinstance(scale, numbers.Real):
        raise TypeError(f"{op}: scale must be a float or None, got {type(scale).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"{op}: return_lse must be a bool, got {type(return_lse).__name__}")


def _check_heads(op, Hq, Hkv):
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"{op}: the query heads must be a multiple of the key/value heads "
                         f"(Hq % Hkv == 0), got Hq={Hq} and Hkv={Hkv}")


class _Features:
    """softcap / sinks / alibi_slopes / bottom_right, checked."""

    __slots__ = ("softcap", "sinks", "alibi_slopes", "bottom_right")

    def __init__(self, op, q, Hq, B, softcap, sinks, alibi_slopes, bottom_right):
        if softcap is not None:
            if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
                raise TypeError(f"{op}: softcap must be a float (> 0; 0 or None = off), "
                                f"got {type(softcap).__name__}")
            if not (float(softcap) >= 0.0 and math.isfinite(float(softcap))):
                raise ValueError(f"{op}: softcap must be a finite float >= 0 (0 or None = off), "
                                 f"got {softcap!r}")
        self.softcap = float(softcap) if softcap else 0.0
        if sinks is not None:
            check_tensor(op, "sinks", sinks, dim=1)
            if sinks.shape[0] != Hq:
                raise ValueError(f"{op}: sinks must have shape ({Hq},) = [Hq], one logit per query "
                                 f"head, got {tuple(sinks.shape)}")
            if sinks.device != q.device:
                raise RuntimeError(f"{op}: sinks is on {sinks.device} but q is on {q.device}")
        self.sinks = sinks
        if alibi_slopes is not None:
            check_tensor(op, "alibi_slopes", alibi_slopes, dim=(1, 2))
            exp = (Hq,) if alibi_slopes.dim() == 1 else (B, Hq)
            if tuple(alibi_slopes.shape) != exp:
                raise ValueError(f"{op}: alibi_slopes must have shape [Hq] = ({Hq},) or [B, Hq] = "
                                 f"({B}, {Hq}), got {tuple(alibi_slopes.shape)}")
            if alibi_slopes.device != q.device:
                raise RuntimeError(f"{op}: alibi_slopes is on {alibi_slopes.device} but q is on "
                                   f"{q.device}")
        self.alibi_slopes = alibi_slopes
        if not isinstance(bottom_right, bool):
            raise TypeError(f"{op}: bottom_right must be a bool, got {type(bottom_right).__name__}")
        self.bottom_right = bottom_right

    def reference_kwargs(self):
        return dict(softcap=self.softcap or None, sinks=self.sinks, alibi_slopes=self.alibi_slopes,
                    bottom_right=self.bottom_right)


def _check_inputs(q, k, v, attn_mask, key_padding_mask):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(_OP, name, t, dim=4)
    check_same(_OP, "q", q, k=k, v=v)
    B, Hq, Sq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{_OP}: k and v must have one shape [B, Hkv, Sk, D], got k {tuple(k.shape)} "
                         f"and v {tuple(v.shape)}")
    if k.shape[0] != B:
        raise ValueError(f"{_OP}: k must have batch size {B} (q's), got {k.shape[0]}")
    if k.shape[3] != D:
        raise ValueError(f"{_OP}: k must have head dim {D} (q's), got {k.shape[3]}")
    _check_heads(_OP, Hq, k.shape[1])
    Sk = k.shape[2]
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"{_OP}: attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"{_OP}: attn_mask must be bool (True = attend) or floating (additive), "
                            f"got {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise RuntimeError(f"{_OP}: attn_mask is on {attn_mask.device} but q is on {q.device}")
        full = (B, Hq, Sq, Sk)
        ok = 2 <= attn_mask.dim() <= 4 and all(
            m == 1 or m == f for m, f in zip(reversed(attn_mask.shape), reversed(full)))
        if not ok:
            raise ValueError(f"{_OP}: attn_mask must be broadcastable to [B, Hq, Sq, Sk] = "
                             f"{list(full)} as [B|1, Hq|1, Sq|1, Sk|1], got {tuple(attn_mask.shape)}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"{_OP}: key_padding_mask must be a bool tensor or None, "
                            f"got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"{_OP}: key_padding_mask must be bool [B, Sk] (True = padded), "
                            f"got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, Sk):
            raise ValueError(f"{_OP}: key_padding_mask must have shape {(B, Sk)} = [B, Sk], "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise RuntimeError(f"{_OP}: key_padding_mask is on {key_padding_mask.device} but q is "
                               f"on {q.device}")


# ---- dispatch -------------------------------------------------------------------------------
def _triton_ok(q, D, dropout_p, Sq, Sk, feats=None) -> Tuple[bool, str]:
    ok, why = backends.triton_available(q.device)
    if not ok:
        return ok, why
    if q.dtype not in _KERNEL_DTYPES:
        return False, f"the Triton kernel takes float16/bfloat16/float32, got {q.dtype}"
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return False, "tl.dot under the Triton interpreter does not support bfloat16"
    if D > _MAX_HEAD_DIM:
        return False, f"the Triton kernel takes head dims up to {_MAX_HEAD_DIM}, got {D}"
    if dropout_p > 0 and Sq * Sk >= 2 ** 31:
        return False, "dropout needs Sq * Sk < 2**31 (Philox counters are int32)"
    if feats is not None and feats.alibi_slopes is not None and feats.alibi_slopes.requires_grad:
        return False, "the Triton kernel gives alibi_slopes no gradient (the reference does)"
    return True, ""


def _backend(q, D, dropout_p, Sq, Sk, *, cpu_ok=(True, ""), feats=None) -> str:
    fast = {}
    triton_ok = None
    if q.device.type == "cuda" or backends.current() == "triton":
        triton_ok = _triton_ok(q, D, dropout_p, Sq, Sk, feats)
    if q.device.type == "cuda":
        fast["triton"] = triton_ok
    elif q.device.type == "cpu":
        fast["cpu"] = cpu_ok
        if backends.current() == "triton":  # the interpreter is for CI, never auto's choice
            fast["triton"] = triton_ok
    return backends.resolve(_OP, q.device, fast=fast)


def _cpu_ok(feats, return_lse, dropout_p) -> Tuple[bool, str]:
    """Whether the CPU path (PyTorch's SDPA kernel, fastbig's conventions folded into its mask)
    takes these inputs."""
    if return_lse and dropout_p > 0:
        return False, "the SDPA CPU kernel cannot return the log-sum-exp with dropout"
    if feats.softcap > 0 or feats.sinks is not None:
        return False, "the SDPA CPU kernel has no logit softcap or attention sinks"
    if feats.alibi_slopes is not None and feats.alibi_slopes.requires_grad:
        return False, "alibi_slopes that require grad (the reference is differentiable)"
    return True, ""


def _new_seed():
    # Drawn from torch's CPU generator: torch.manual_seed makes runs reproducible, no GPU sync.
    return torch.randint(0, 2 ** 31 - 1, (), dtype=torch.int64)


def _q_has_nan(q) -> bool:
    """SDPA's CPU kernel gives finite output for a query row holding NaN (the math, and the
    reference, give NaN); inf in q and NaN/inf in k or v it propagates as the math does (checked
    against the reference in float64). One reduction: NaN anywhere in q makes the sum NaN (so does
    +inf with -inf, which then just takes the reference). Skipped while torch.compile traces: a
    data-dependent branch would break the graph."""
    if torch.compiler.is_compiling() or q.numel() == 0:
        return False
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    return bool(torch.isnan(q.sum(dtype=acc)))


def _floored_rows(mask, Sk) -> bool:
    """Whether a row of an additive mask is, on every key, so negative (finite) that adding
    log(Sk) to it changes nothing: the softmax of that row is still uniform (the math and the
    reference agree), but a backward that recomputes it as exp(s - lse) gets 1 instead of 1/Sk.
    Skipped while torch.compile traces (a data-dependent branch)."""
    if torch.compiler.is_compiling() or mask.numel() == 0:
        return False
    acc = torch.float64 if mask.dtype == torch.float64 else torch.float32
    m = mask.detach().amax(dim=-1).to(acc)
    return bool((torch.isfinite(m) & (m + math.log(max(Sk, 2)) == m)).any())


def _reference(q, k, v, left, right, attn_mask, key_padding_mask, dropout_p, scale, return_lse,
               feats=None):
    keep = None
    if dropout_p > 0:
        keep = torch.rand(q.shape[0], q.shape[1], q.shape[2], k.shape[2], device=q.device) >= dropout_p
    return ref.attention(q, k, v, window=(left, right), attn_mask=attn_mask,
                         key_padding_mask=key_padding_mask, dropout_p=float(dropout_p),
                         dropout_keep=keep, scale=scale, return_lse=return_lse,
                         **(feats.reference_kwargs() if feats is not None else {}))


def _sdpa_cpu(q, k, v, left, right, attn_mask, key_padding_mask, dropout_p, scale, return_lse,
              alibi_slopes=None, bottom_right=False):
    """PyTorch's SDPA CPU kernel with fastbig's mask conventions folded into one mask.

    float16/bfloat16 run in float32 and round once at the end: on CPU that is both faster (about
    2x for fwd+bwd at B2 H4 S512 D64) and more accurate than SDPA's half-precision CPU kernel."""
    dtype = q.dtype
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    # bf16 without grad: SDPA's native bf16 forward beats the fp32 round trip (1.1x causal
    # B8 H8 S1024, 2.8x decode Sk4096 on 2 AVX2 cores); its native bf16 backward is 4x slower
    if dtype == torch.float16 or (dtype == torch.bfloat16 and grad):
        res = _sdpa_cpu(q.float(), k.float(), v.float(), left, right, attn_mask, key_padding_mask,
                        dropout_p, scale, return_lse, alibi_slopes, bottom_right)
        return (res[0].to(dtype), res[1]) if return_lse else res.to(dtype)
    Sq, Sk = q.shape[2], k.shape[2]
    mask = attn_mask
    if alibi_slopes is not None:  # an additive bias; bool masks become -inf where False
        bias = ref.alibi_bias(alibi_slopes.to(q.dtype), Sq, Sk, bottom_right=bottom_right)
        mask = bias if mask is None else (torch.where(mask, bias, float("-inf"))
                                          if mask.dtype == torch.bool else mask.to(q.dtype) + bias)
    causal = (left < 0 and right == 0 and mask is None and key_padding_mask is None
              and (not bottom_right or Sq == Sk))
    if not causal:
        pos = ref.allowed_positions(Sq, Sk, window=(left, right), device=q.device,
                                    bottom_right=bottom_right)
        if pos is not None:
            mask = pos if mask is None else (mask & pos if mask.dtype == torch.bool
                                             else torch.where(pos, mask, float("-inf")))
        if key_padding_mask is not None:
            kp = key_padding_mask[:, None, None, :]
            mask = ~kp if mask is None else (mask & ~kp if mask.dtype == torch.bool
                                             else torch.where(kp, float("-inf"), mask))
    if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    if not return_lse:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=float(dropout_p),
                                              is_causal=causal, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    # The log-sum-exp comes from the flash-for-CPU aten op (no dropout; it takes additive masks).
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    # That private op reads garbage when the head dim is not the innermost stride (torch 2.14).
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    fmask = mask
    if mask is not None and mask.dtype == torch.bool:
        fmask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    if fmask is not None and fmask.requires_grad:
        # that op has no gradient for the mask: out from SDPA, lse from it without autograd
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=fmask, is_causal=causal, scale=scale)
        with torch.no_grad():
            lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, causal, attn_mask=fmask.detach(), scale=scale)[1]
    else:
        res = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=fmask, scale=scale)
        out, lse = res[0], res[1].detach()
    if mask is not None:  # that kernel reports 0 on fully masked rows; the math says -inf
        attend = mask if mask.dtype == torch.bool else mask > float("-inf")
        empty = ~attend.expand(q.shape[0], q.shape[1], Sq, Sk).any(-1)
        lse = lse.masked_fill(empty, float("-inf"))
    elif Sk == 0:
        lse = torch.full_like(lse, float("-inf"))
    return out, lse.float()


def attention(q, k, v, *, causal=False, window=None, attn_mask=None, key_padding_mask=None,
              dropout_p=0.0, scale=None, return_lse=False, softcap=None, sinks=None,
              alibi_slopes=None, bottom_right=False):
    """Flash attention. q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] with Hq % Hkv == 0.

    causal: top-left aligned (SDPA's is_causal) unless bottom_right. window: (left, right),
    query i sees keys i-left..i+right (None/-1 = unbounded). attn_mask: bool (True = attend) or
    additive float, broadcastable as [B|1, Hq|1, Sq, Sk]. key_padding_mask: bool [B, Sk], True =
    padded key. dropout_p: applied whenever > 0 (as SDPA). scale: default 1/sqrt(D).
    softcap: scores become softcap * tanh(scores / softcap) (Gemma 2); None/0 = off.
    sinks: float [Hq], a learned logit per head in the softmax denominator (GPT-OSS); gets a
    gradient. alibi_slopes: fp32 [Hq] or [B, Hq], adds -slope * |i + off - j| (BLOOM, MPT).
    bottom_right: causal and window aligned to the bottom-right corner, off = Sk - Sq (a KV
    cache: query i is at key position i + Sk - Sq).
    Returns out [B, Hq, Sq, D] (and lse [B, Hq, Sq] fp32 if return_lse; not differentiable).
    """
    _check_inputs(q, k, v, attn_mask, key_padding_mask)
    _check_common(_OP, q, dropout_p, scale, return_lse)
    left, right = _window(causal, window)
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    feats = _Features(_OP, q, Hq, B, softcap, sinks, alibi_slopes, bottom_right)
    scale_f = (1.0 / math.sqrt(D) if D > 0 else 1.0) if scale is None else float(scale)  # D=0: empty output
    cpu_ok = _cpu_ok(feats, return_lse, dropout_p)
    ours = _attention_cpu.use_ours(q, B, Sq, Sk, left, right, attn_mask, key_padding_mask, dropout_p,
                                   feats, kv=(k, v))
    if not ours and cpu_ok[0] and q.device.type == "cpu" and _q_has_nan(q):
        cpu_ok = (False, "q holds NaN, which the SDPA CPU kernel turns into finite numbers")
    backend = _backend(q, D, dropout_p, Sq, Sk, cpu_ok=(True, "") if ours else cpu_ok, feats=feats)
    if backend != "reference" and attn_mask is not None and attn_mask.is_floating_point() and \
            torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in
                                            (q, k, v, attn_mask, feats.sinks)) and \
            _floored_rows(attn_mask, Sk):
        backend = backends.resolve(_OP, q.device, fast={backend: (False, (
            "an additive attn_mask row so negative on every key (e.g. finfo.min, an eager "
            "model's padding) that log(Sk) vanishes beside it: the kernels' backward recomputes "
            "the softmax from the log-sum-exp and would give that row Sk times its gradient"))})
    if backend == "cpu" and (q.numel() == 0 or k.numel() == 0):
        backend = "reference"  # SDPA's CPU kernel dies of SIGFPE on Sk == 0; nothing to compute
    if backend == "cpu" and ours:  # fastbig's own kernel (ops/_attention_cpu.py) where it wins
        return _attention_cpu.run(q, k, v, left, right, attn_mask, key_padding_mask, scale_f,
                                  return_lse, feats)
    if backend == "cpu":
        return _sdpa_cpu(q, k, v, left, right, attn_mask, key_padding_mask, dropout_p, scale,
                         return_lse, feats.alibi_slopes, feats.bottom_right)
    if backend == "reference":
        return _reference(q, k, v, left, right, attn_mask, key_padding_mask, dropout_p, scale_f,
                          return_lse, feats)
    seed = _new_seed() if dropout_p > 0 else None
    out, lse = _flash_attn(q, k, v, attn_mask, key_padding_mask, None, None, Sq, Sk, scale_f,
                           left, right, float(dropout_p), seed, feats.softcap, feats.sinks,
                           feats.alibi_slopes, feats.bottom_right)
    return (out, lse) if return_lse else out


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                     causal=False, window=None, dropout_p=0.0, scale=None, return_lse=False,
                     softcap=None, sinks=None, alibi_slopes=None, bottom_right=False):
    """Packed sequences, as flash_attn_varlen_func: q [total_q, Hq, D], k/v [total_k, Hkv, D],
    cu_seqlens_* int32 [B + 1] (prefix sums of the lengths), max_seqlen_* the longest lengths.
    softcap, sinks, alibi_slopes ([Hq] or [B, Hq]) and bottom_right as attention(); bottom_right
    aligns each sequence on its own (query i of sequence b at key position i + Sk_b - Sq_b).
    Returns out [total_q, Hq, D] (and lse [Hq, total_q] fp32 if return_lse)."""
    op = "attention_varlen"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t, dim=3)
    check_same(op, "q", q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have one shape [total_k, Hkv, D], got k "
                         f"{tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"{op}: k must have head dim {q.shape[2]} (q's), got {k.shape[2]}")
    _check_heads(op, q.shape[1], k.shape[1])
    _check_common(op, q, dropout_p, scale, return_lse)
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]),
                            ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(cu).__name__}")
        if cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{op}: {name} must be a 1-D int32 tensor [B + 1], got {cu.dtype} "
                             f"with shape {tuple(cu.shape)}")
        if cu.device != q.device:
            raise RuntimeError(f"{op}: {name} is on {cu.device} but q is on {q.device}")
        if cu.device.type == "cpu":  # cheap here; on a GPU this would be a host sync
            lens = cu.diff()
            if int(cu[0]) != 0 or int(cu[-1]) != total or bool((lens < 0).any()):
                raise ValueError(f"{op}: {name} must rise from 0 to {total} (the packed length), "
                                 f"got {cu.tolist()}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must both be [B + 1], got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()} entries")
    for name, val in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(val, numbers.Integral) or val < 0:
            raise ValueError(f"{op}: {name} must be a non-negative int, got {val!r}")
    if cu_seqlens_q.device.type == "cpu":
        for name, cu, mx in (("max_seqlen_q", cu_seqlens_q, max_seqlen_q),
                             ("max_seqlen_k", cu_seqlens_k, max_seqlen_k)):
            if int(cu.diff().max()) > mx:
                raise ValueError(f"{op}: {name} must be at least the longest sequence "
                                 f"({int(cu.diff().max())}), got {mx}")
    left, right = _window(causal, window, op)
    D = q.shape[2]
    feats = _Features(op, q, q.shape[1], cu_seqlens_q.numel() - 1, softcap, sinks, alibi_slopes,
                      bottom_right)
    scale_f = (1.0 / math.sqrt(D) if D > 0 else 1.0) if scale is None else float(scale)  # D=0: empty output
    cpu_ok = _cpu_ok(feats, return_lse, dropout_p)
    ours = _attention_cpu.use_ours(q, cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k, left,
                                   right, None, None, dropout_p, feats, kv=(k, v))
    if not ours and cpu_ok[0] and q.device.type == "cpu" and _q_has_nan(q):
        cpu_ok = (False, "q holds NaN, which the SDPA CPU kernel turns into finite numbers")
    backend = _backend(q, D, dropout_p, max_seqlen_q, max_seqlen_k, cpu_ok=(True, "") if ours else cpu_ok,
                       feats=feats)
    if backend == "triton":
        seed = _new_seed() if dropout_p > 0 else None
        cuq = cu_seqlens_q.to(torch.int32)
        cuk = cu_seqlens_k.to(torch.int32)
        out, lse = _flash_attn(q, k, v, None, None, cuq, cuk, int(max_seqlen_q), int(max_seqlen_k),
                               scale_f, left, right, float(dropout_p), seed, feats.softcap,
                               feats.sinks, feats.alibi_slopes, feats.bottom_right)
        return (out, lse) if return_lse else out
    # CPU / reference: one batched call per sequence.
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qb = q[cq[b]:cq[b + 1]].transpose(0, 1)[None]
        kb = k[ck[b]:ck[b + 1]].transpose(0, 1)[None]
        vb = v[ck[b]:ck[b + 1]].transpose(0, 1)[None]
        slopes = feats.alibi_slopes
        if slopes is not None and slopes.dim() == 2:
            slopes = slopes[b]
        fb = _Features(op, q, q.shape[1], 1, feats.softcap, feats.sinks, slopes, feats.bottom_right)
        args = (qb, kb, vb, left, right, None, None, dropout_p, scale_f, return_lse)
        empty = qb.numel() == 0 or kb.numel() == 0  # SDPA's CPU kernel dies on Sk == 0
        if backend == "cpu" and not empty and ours:
            res = _attention_cpu.run(qb, kb, vb, left, right, None, None, scale_f, return_lse, fb)
        else:
            res = (_sdpa_cpu(*args, fb.alibi_slopes, fb.bottom_right) if backend == "cpu" and not empty
                   else _reference(*args, fb))
        o, lse = res if return_lse else (res, None)
        outs.append(o[0].transpose(0, 1))
        if return_lse:
            lses.append(lse[0])
    out = torch.cat(outs, dim=0)
    return (out, torch.cat(lses, dim=1)) if return_lse else out


def dropout_mask(B, H, Sq, Sk, dropout_p, seed, device="cpu"):
    """The keep-mask the Triton kernels apply for (seed, dropout_p): bool [B, H, Sq, Sk]."""
    return _kernels().dropout_mask(B, H, Sq, Sk, dropout_p, seed, device)
