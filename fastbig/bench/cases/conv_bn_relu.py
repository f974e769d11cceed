"""Conv+BN+ReLU cases: fastbig.nn.ConvBnReLU2d against nn.Sequential(Conv2d, BatchNorm2d, ReLU)
(oneDNN on CPU, cuDNN on GPU) and its torch.compile; fastbig.ops.bn_act (BN+ReLU alone) against
eager F.batch_norm + F.relu and its torch.compile.

Work: conv 2*N*K*C*R*S*P*Q/groups FLOPs, backward 2x the forward; BN+activation alone is memory
bound: bytes of its minimal traffic (forward reads z and writes y, backward reads dy and z and
writes dz).
"""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import (Case, Goal, Impl, _compile, _fastbig, _load, _module_run, _skip, _smoke,
                    fwd_bwd, kink_safe_grad, randn)


# ---- the cases ----------------------------------------------------------------------------
def conv_flops(N, C, K, R, S, P, Q, groups, mode) -> float:
    f = 2.0 * N * K * C * R * S * P * Q / groups
    return f * 3 if mode == "fwd+bwd" else f


def _conv_seq(C, K, ks):
    return nn.Sequential(nn.Conv2d(C, K, ks, padding=ks // 2, bias=False), nn.BatchNorm2d(K),
                         nn.ReLU())


def _conv_state(C, K, ks, gen):
    st = {}
    for k, v in _conv_seq(C, K, ks).state_dict().items():
        if k == "0.weight":
            st[k] = torch.randn(v.shape, dtype=torch.float64, generator=gen) / math.sqrt(C * ks * ks)
        elif k == "1.weight":
            st[k] = 1.0 + 0.2 * torch.randn(v.shape, dtype=torch.float64, generator=gen)
        elif k in ("1.bias", "1.running_mean"):
            st[k] = 0.2 * torch.randn(v.shape, dtype=torch.float64, generator=gen)
        elif k == "1.running_var":
            st[k] = 0.5 + torch.rand(v.shape, dtype=torch.float64, generator=gen)
        else:
            st[k] = v.clone()
    return st


def conv_case(N, C, K, HW, ks, mode, *, goals=None, compile_ok=True, compile_skip_reason="",
              name=None, channels_last=False) -> Case:
    bwd = mode == "fwd+bwd"

    def make(device, dtype, gen):
        x = randn((N, C, HW, HW), dtype, device, gen)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        inp = {"x": x.requires_grad_(bwd),
               "state": _conv_state(C, K, ks, gen), "dtype": dtype, "device": device}
        if bwd:
            with torch.no_grad():
                seq = _load(_conv_seq(C, K, ks), inp["state"], torch.float64, device).train()
                u64 = seq[1](seq[0](inp["x"].detach().double()))      # pre-activation
            inp["grad_out"] = kink_safe_grad(randn((N, K, HW, HW), dtype, device, gen), u64, dtype)
        return inp

    def call(mod, inp):
        y = mod(inp["x"])
        if not bwd:
            return [y]
        bn = mod[1] if isinstance(mod, nn.Sequential) else mod._orig_mod[1]
        return [y, bn.running_mean.clone(), bn.running_var.clone()]

    def prep(mod):
        return mod.train() if bwd else mod.eval()

    def build_fastbig(reference=False):
        def build(inp):
            fb = _fastbig()
            mod = prep(_load(fb.nn.ConvBnReLU2d(C, K, ks, padding=ks // 2), inp["state"], inp["dtype"],
                             inp["device"]))
            ctx = (lambda: fb.backends.use("reference")) if reference else None
            return _module_run(inp, mod, call, bwd, ctx)
        return build

    def build_torch(compiled=False):
        def build(inp):
            mod = prep(_load(_conv_seq(C, K, ks), inp["state"], inp["dtype"], inp["device"]))
            if compiled:
                mod = _compile(mod)
            return _module_run(inp, mod, call, bwd)
        return build

    def oracle(inp):
        mod = prep(_load(_conv_seq(C, K, ks), inp["state"], torch.float64, inp["device"]))
        return _module_run(inp, mod, call, bwd)()

    impls = [
        Impl("fastbig", "fastbig", build_fastbig()),
        Impl("fastbig-ref", "reference", build_fastbig(reference=True)),
        Impl("torch.nn", "baseline", build_torch(),
             note="nn.Sequential(Conv2d, BatchNorm2d, ReLU): oneDNN on CPU, cuDNN on GPU"),
        Impl("compile(torch.nn)", "baseline", build_torch(compiled=True), compiled=True),
    ]
    name = name or f"{'train' if bwd else 'infer'} N{N} C{C}->{K} {HW}x{HW} {ks}x{ks}" + \
        (" channels_last" if channels_last else "")
    return Case("conv_bn_relu", name, mode, dict(N=N, C=C, K=K, HW=HW, ks=ks, channels_last=channels_last), make,
                oracle, impls,
                conv_flops(N, C, K, ks, ks, HW, HW, 1, mode), "FLOP", eager="torch.nn",
                goals=goals or [], size=N * K * HW * HW * ks * ks, compile_ok=compile_ok,
                compile_skip_reason=compile_skip_reason)


def bn_act_case(N, K, HW, *, goals=None, compile_ok=True, compile_skip_reason="") -> Case:
    mode = "fwd+bwd"
    momentum, eps = 0.1, 1e-5

    def make(device, dtype, gen):
        inp = {"x": randn((N, K, HW, HW), dtype, device, gen, scale=1.5, requires_grad=True),
               "weight": (1.0 + 0.2 * randn((K,), dtype, device, gen)).requires_grad_(True),
               "bias": (0.2 * randn((K,), dtype, device, gen)).requires_grad_(True),
               "running_mean": 0.2 * randn((K,), dtype, device, gen),
               "running_var": 0.5 + torch.rand(K, dtype=torch.float64, generator=gen).to(
                   device=device, dtype=dtype), "dtype": dtype}
        with torch.no_grad():
            u64 = F.batch_norm(inp["x"].double(), None, None, inp["weight"].double(),
                               inp["bias"].double(), True, momentum, eps)
        inp["grad_out"] = kink_safe_grad(randn((N, K, HW, HW), dtype, device, gen), u64, dtype)
        return inp

    def eager(x, w, b, rm, rv):
        return F.relu(F.batch_norm(x, rm, rv, w, b, True, momentum, eps))

    def build_with(get_fn):
        def build(inp):
            f = get_fn()
            rm, rv = inp["running_mean"].clone(), inp["running_var"].clone()  # its own buffers
            x, w, b = inp["x"], inp["weight"], inp["bias"]

            def run():
                y = f(x, w, b, rm, rv)
                return fwd_bwd([y], [x, w, b], [inp["grad_out"]])
            return run
        return build

    def fastbig_fn():
        op = _fastbig().ops.bn_act
        return lambda x, w, b, rm, rv: op(x, w, b, rm, rv, training=True, momentum=momentum,
                                          eps=eps, activation="relu")

    def fastbig_ref_fn():
        f = fastbig_fn()
        use = _fastbig().backends.use

        def g(*a):
            with use("reference"):
                return f(*a)
        return g

    def oracle(inp):
        return build_with(lambda: eager)(inp)()

    impls = [
        Impl("fastbig", "fastbig", build_with(fastbig_fn)),
        Impl("fastbig-ref", "reference", build_with(fastbig_ref_fn)),
        Impl("eager", "baseline", build_with(lambda: eager),
             note="F.batch_norm(training=True) + F.relu"),
        Impl("compile(eager)", "baseline", build_with(lambda: _compile(eager)), compiled=True),
    ]
    elem = N * K * HW * HW
    return Case("conv_bn_relu", f"BN+ReLU alone fwd+bwd N{N} C{K} {HW}x{HW}", mode,
                dict(N=N, K=K, HW=HW), make, oracle, impls, 5.0 * elem, "B", work_per_element=True, eager="eager",
                goals=goals or [], size=elem, compile_ok=compile_ok,
                compile_skip_reason=compile_skip_reason)


# ---- the tables ----------------------------------------------------------------------------
def cpu_cases(quick: bool) -> List[Case]:
    N = 8 if quick else 32
    return [
        conv_case(N, 64, 64, 56, 3, "fwd+bwd", goals=[Goal("fastbig", "torch.nn", 1.1)],
                  **_skip(quick)),
        conv_case(N, 64, 64, 56, 1, "fwd+bwd", goals=[Goal("fastbig", "torch.nn", 1.25)],
                  **_skip(quick)),
        conv_case(N, 64, 64, 56, 3, "infer", goals=[Goal("fastbig", "torch.nn", 1.25),
                                                   Goal("fastbig", "compile(torch.nn)", 1.0)],
                  **_skip(quick)),
        conv_case(N, 64, 64, 56, 1, "infer", goals=[Goal("fastbig", "torch.nn", 1.25),
                                                   Goal("fastbig", "compile(torch.nn)", 1.0)],
                  **_skip(quick, keep=True)),
        bn_act_case(N, 64, 56, goals=[Goal("fastbig", "eager", 2.0)], **_skip(quick)),
    ] + [  # channels_last inputs (oneDNN's native layout): no goal, the layout's own numbers
        conv_case(N, 64, 64, 56, ks, "infer", channels_last=True, **_skip(quick)) for ks in (3, 1)
    ] + ([] if quick else [conv_case(N, 64, 64, 56, 3, "fwd+bwd", channels_last=True)])


def gpu_cases(quick: bool) -> List[Case]:
    N = 8 if quick else 32
    return [
        conv_case(N, 64, 64, 56, ks, mode, goals=[Goal("fastbig", "torch.nn", g)])
        for ks, g_train, g_inf in ((3, 1.1, 1.25), (1, 1.25, 1.25))
        for mode, g in (("fwd+bwd", g_train), ("infer", g_inf))
    ] + [bn_act_case(N, 64, 56, goals=[Goal("fastbig", "eager", 2.0)])]


def smoke_cases() -> List[Case]:
    return [conv_case(2, 3, 4, 9, 3, "fwd+bwd", **_smoke()), bn_act_case(2, 3, 5, **_smoke())]
