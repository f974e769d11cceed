"""Attention cases: fastbig.ops.attention against eager attention, SDPA (each backend this device
has), torch.compile of the eager code and compiled FlexAttention.

Work: forward 4*B*H*Sq*Sk*D FLOPs, halved when causal; backward 2.5x the forward.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from ._base import (Case, Goal, Impl, NotAvailable, _compile, _fastbig, _nothing, _skip, _smoke,
                    fwd_bwd, randn)


# ---- the cases ----------------------------------------------------------------------------
def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    be = {"math": "MATH", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
          "cudnn": "CUDNN_ATTENTION"}[name]
    if not hasattr(SDPBackend, be):
        raise NotAvailable(f"torch has no SDPBackend.{be}")
    return lambda: sdpa_kernel([getattr(SDPBackend, be)])


def attention_flops(B, H, Sq, Sk, D, causal, mode) -> float:
    fwd = 4.0 * B * H * Sq * Sk * D
    if causal:
        fwd /= 2
    return fwd * 3.5 if mode == "fwd+bwd" else fwd


def attention_eager(q, k, v, causal=False):
    """Attention as a user writes it in eager torch: scores, mask, softmax, matmul."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    if causal:
        Sq, Sk = q.shape[-2], k.shape[-2]
        mask = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).triu(1)
        s = s.masked_fill(mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)


def _attention_oracle(causal, bwd):
    """Eager attention in float64, a block of query rows at a time (bounded memory)."""
    def oracle(inp):
        q, k, v = inp["q"], inp["k"], inp["v"]
        B, H, Sq, D = q.shape
        Sk = k.shape[2]
        block_bytes = (2 << 30) if q.device.type == "cuda" else (256 << 20)
        rows = max(1, min(Sq, block_bytes // max(1, B * H * Sk * 8 * 3)))
        q_ = q.detach().requires_grad_(bwd)
        k_ = k.detach().requires_grad_(bwd)
        v_ = v.detach().requires_grad_(bwd)
        outs = []
        scale = 1.0 / math.sqrt(D)
        for r0 in range(0, Sq, rows):
            r1 = min(Sq, r0 + rows)
            with torch.set_grad_enabled(bwd):
                s = torch.matmul(q_[:, :, r0:r1], k_.transpose(-2, -1)) * scale
                if causal:
                    i = torch.arange(r0, r1, device=q.device)[:, None]
                    j = torch.arange(Sk, device=q.device)[None, :]
                    s = s.masked_fill(j > i, float("-inf"))
                o = torch.matmul(torch.softmax(s, dim=-1), v_)
                if bwd:
                    torch.autograd.backward(o, inp["grad_out"][:, :, r0:r1])
            outs.append(o.detach())
        out = [torch.cat(outs, dim=2)]
        if bwd:
            out += [q_.grad, k_.grad, v_.grad]
        return out
    return oracle


def _attention_impls(causal: bool, bwd: bool, only: Optional[Sequence[str]] = None) -> List[Impl]:
    def wrap(call, ctx=None):
        def build(inp):
            q, k, v = inp["q"], inp["k"], inp["v"]
            cm = ctx() if ctx is not None else None
            f = call(inp)

            def run():
                with (cm() if cm is not None else _nothing()):
                    o = f(q, k, v)
                    if bwd:
                        return fwd_bwd([o], [q, k, v], [inp["grad_out"]])
                    return [o.detach()]
            return run
        return build

    def fastbig_call(inp):
        att = _fastbig().ops.attention
        return lambda q, k, v: att(q, k, v, causal=causal)

    def ref_call(inp):
        fb = _fastbig()
        att, use = fb.ops.attention, fb.backends.use

        def f(q, k, v):
            with use("reference"):
                return att(q, k, v, causal=causal)
        return f

    def sdpa_call(inp):
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def eager_call(inp):
        return lambda q, k, v: attention_eager(q, k, v, causal)

    def compile_call(inp):
        g = _compile(attention_eager)
        return lambda q, k, v: g(q, k, v, causal)

    def flex_call(inp):
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as e:
            raise NotAvailable(f"torch.nn.attention.flex_attention: {e}") from None
        q = inp["q"]
        B, H, S, _ = q.shape
        block_mask = None
        if causal:
            block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, S,
                                           inp["k"].shape[2], device=str(q.device))
        g = _compile(flex_attention)
        return lambda q, k, v: g(q, k, v, block_mask=block_mask)

    impls = [
        Impl("fastbig", "fastbig", wrap(fastbig_call)),
        Impl("fastbig-ref", "reference", wrap(ref_call)),
        Impl("eager", "baseline", wrap(eager_call)),
        Impl("sdpa", "baseline", wrap(sdpa_call)),
    ]
    for be in ("math", "flash", "efficient", "cudnn"):
        def mk(be=be):
            def ctx():
                return _sdpa_backend(be)
            return wrap(sdpa_call, ctx)
        impls.append(Impl(f"sdpa[{be}]", "baseline", mk(),
                          devices=("cpu", "cuda") if be in ("math", "flash") else ("cuda",)))
    impls.append(Impl("compile(eager)", "baseline", wrap(compile_call), compiled=True))
    impls.append(Impl("compile(flex)", "baseline", wrap(flex_call), compiled=True))
    if only is not None:
        impls = [i for i in impls if i.name in only]
    return impls


def attention_case(B, H, S, D, causal, mode, *, goals=None, only=None, compile_ok=True,
                   compile_skip_reason="", name=None, Sq=None) -> Case:
    """S keys and S query rows, or Sq query rows (decode: Sq = 1 against an S-key cache)."""
    bwd = mode == "fwd+bwd"
    Sq = S if Sq is None else Sq

    def make(device, dtype, gen):
        inp = {"q": randn((B, H, Sq, D), dtype, device, gen, requires_grad=bwd),
               "k": randn((B, H, S, D), dtype, device, gen, requires_grad=bwd),
               "v": randn((B, H, S, D), dtype, device, gen, requires_grad=bwd),
               "dtype": dtype}
        if bwd:
            inp["grad_out"] = randn((B, H, Sq, D), dtype, device, gen)
        return inp

    name = name or f"{mode} B{B} H{H} S{S} D{D}{' causal' if causal else ''}"
    params = dict(B=B, H=H, S=S, D=D, causal=causal) if Sq == S else dict(B=B, H=H, Sq=Sq, Sk=S, D=D,
                                                                           causal=causal)
    return Case("attention", name, mode, params, make,
                _attention_oracle(causal, bwd), _attention_impls(causal, bwd, only),
                attention_flops(B, H, Sq, S, D, causal, mode), "FLOP", eager="eager",
                goals=goals or [], size=S, compile_ok=compile_ok,
                compile_skip_reason=compile_skip_reason)


# ---- the tables ----------------------------------------------------------------------------
def cpu_cases(quick: bool) -> List[Case]:
    g = [Goal("fastbig", "sdpa", 0.95)]
    mem_goal = [Goal("fastbig", None, max_bytes=64 << 20)]
    return [
        attention_case(8, 8, 1024, 64, True, "fwd", goals=g, **_skip(quick)),
        attention_case(8, 8, 1024, 64, True, "fwd+bwd", goals=g, **_skip(quick)),
        attention_case(1, 1, 8192, 64, False, "fwd", goals=mem_goal,
                       only=("fastbig", "sdpa", "eager") if quick else
                       ("fastbig", "sdpa", "sdpa[math]", "eager"),
                       name="fwd B1 H1 S8192 D64 (O(S) memory)"),
        # decode against a KV cache: K/V streaming (GB/s = 2*B*H*Sk*D*itemsize / time)
        attention_case(8, 32, 4096, 128, False, "fwd", goals=g, Sq=1,
                       only=("fastbig", "sdpa", "eager"), name="decode B8 H32 Sq1 Sk4096 D128"),
    ]


GPU_COMPILE_SEQS = ("torch.compile (eager, FlexAttention) runs at S=1024 and S=8192 only: one "
                    "compile per case would take most of the run")


def gpu_cases(quick: bool) -> List[Case]:
    seqs = (1024, 4096) if quick else (512, 1024, 2048, 4096, 8192, 16384)
    out = []
    for D in (64, 128):
        for causal in ((True,) if quick else (False, True)):
            for S in seqs:
                for mode in ("fwd", "fwd+bwd"):
                    B, H = max(1, 16384 // S), 2048 // D
                    comp = {} if S in (1024, 8192) else dict(
                        compile_ok=False, compile_skip_reason=GPU_COMPILE_SEQS)
                    out.append(attention_case(B, H, S, D, causal, mode,
                                              goals=[Goal("fastbig", "sdpa", 0.95)], **comp))
    out.append(attention_case(1, 1, 8192, 64, False, "fwd",
                              goals=[Goal("fastbig", None, max_bytes=64 << 20)],
                              only=("fastbig", "sdpa", "sdpa[math]", "eager"),
                              name="fwd B1 H1 S8192 D64 (O(S) memory)"))
    return out


def smoke_cases() -> List[Case]:
    return [attention_case(1, 2, 17, 16, True, "fwd+bwd", goals=[Goal("fastbig", "sdpa", 0.95)],
                           **_smoke())]
