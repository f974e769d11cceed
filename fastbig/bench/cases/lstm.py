"""LSTM cases: fastbig.nn.LSTM / LSTMCell against torch.nn (oneDNN on CPU, cuDNN on GPU, and
aten's own loop with those switched off) and torch.compile.

Work: 8*B*H*(I+H) FLOPs per step, layer and direction forward (the GEMMs); backward 2x that.
"""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn as nn

from ._base import Case, Goal, Impl, _compile, _fastbig, _load, _module_run, _skip, _smoke, randn


# ---- the cases ----------------------------------------------------------------------------
def lstm_flops(T, B, I, H, layers, mode, bidirectional=False) -> float:
    dirs = 2 if bidirectional else 1
    f = 0.0
    for layer in range(layers):
        inp = I if layer == 0 else H * dirs
        f += 8.0 * B * H * (inp + H) * T * dirs
    return f * 3 if mode == "fwd+bwd" else f


def _lstm_state(I, H, layers, gen):
    mod = nn.LSTM(I, H, layers)
    bound = 1.0 / math.sqrt(H)
    return {k: (torch.rand(v.shape, dtype=torch.float64, generator=gen) * 2 - 1) * bound
            for k, v in mod.state_dict().items()}


def _no_vendor_rnn(device):
    """torch.nn.LSTM with oneDNN (CPU) / cuDNN (GPU) switched off: aten's own loop."""
    if device == "cuda":
        return lambda: torch.backends.cudnn.flags(enabled=False)
    return lambda: torch.backends.mkldnn.flags(enabled=False)


def lstm_case(T, B, I, H, layers, mode, *, goals=None, compile_ok=True, compile_skip_reason="",
              name=None) -> Case:
    bwd = mode == "fwd+bwd"

    def make(device, dtype, gen):
        inp = {"x": randn((T, B, I), dtype, device, gen, requires_grad=bwd),
               "state": _lstm_state(I, H, layers, gen), "dtype": dtype, "device": device}
        if bwd:
            inp["grad_out"] = randn((T, B, H), dtype, device, gen)
        return inp

    def call(mod, inp):
        y, (h, c) = mod(inp["x"])
        return [y, h, c]

    def build_torch(ctx_for_device=None):
        def build(inp):
            mod = _load(nn.LSTM(I, H, layers), inp["state"], inp["dtype"], inp["device"])
            ctx = ctx_for_device(inp["device"]) if ctx_for_device else None
            return _module_run(inp, mod, call, bwd, ctx)
        return build

    def build_fastbig(reference=False):
        def build(inp):
            fb = _fastbig()
            mod = _load(fb.nn.LSTM(I, H, layers), inp["state"], inp["dtype"], inp["device"])
            ctx = (lambda: fb.backends.use("reference")) if reference else None
            return _module_run(inp, mod, call, bwd, ctx)
        return build

    def build_compile(inp):
        mod = _load(nn.LSTM(I, H, layers), inp["state"], inp["dtype"], inp["device"])
        return _module_run(inp, _compile(mod), call, bwd)

    def oracle(inp):
        mod = _load(nn.LSTM(I, H, layers), inp["state"], torch.float64, inp["device"])
        return _module_run(inp, mod, call, bwd)()

    impls = [
        Impl("fastbig", "fastbig", build_fastbig()),
        Impl("fastbig-ref", "reference", build_fastbig(reference=True)),
        Impl("torch.nn", "baseline", build_torch(), note="oneDNN on CPU, cuDNN on GPU"),
        Impl("torch.nn[native]", "baseline", build_torch(_no_vendor_rnn),
             note="oneDNN/cuDNN switched off: aten's own loop"),
        Impl("compile(torch.nn)", "baseline", build_compile, compiled=True,
             note="dynamo makes no graph of nn.LSTM (torch 2.14: it runs eager aten)"),
    ]
    name = name or f"{'train' if bwd else 'infer'} T{T} B{B} I{I} H{H} L{layers}"
    return Case("lstm", name, mode, dict(T=T, B=B, I=I, H=H, layers=layers), make, oracle, impls,
                lstm_flops(T, B, I, H, layers, mode), "FLOP", eager="torch.nn",
                goals=goals or [], size=H * 1000 + B, compile_ok=compile_ok,
                compile_skip_reason=compile_skip_reason)


def lstm_cell_loop_case(T, B, I, H, mode, *, goals=None, compile_ok=True,
                        compile_skip_reason="", unbind=False) -> Case:
    """A Python loop of T LSTMCell steps. The step's input is x[t] (a select of one [T, B, I] leaf:
    its backward zero-fills and accumulates a full-size gradient every step, on both sides), or
    with ``unbind`` the slices of x.unbind(0), whose backward is one stack: closer to a decoder,
    whose per-step input is a fresh tensor (an embedding)."""
    bwd = mode == "fwd+bwd"

    def make(device, dtype, gen):
        st = {k: (torch.rand(v.shape, dtype=torch.float64, generator=gen) * 2 - 1) / math.sqrt(H)
              for k, v in nn.LSTMCell(I, H).state_dict().items()}
        inp = {"x": randn((T, B, I), dtype, device, gen, requires_grad=bwd),
               "h0": randn((B, H), dtype, device, gen, scale=0.5),
               "c0": randn((B, H), dtype, device, gen, scale=0.5),
               "state": st, "dtype": dtype, "device": device}
        if bwd:
            inp["grad_out"] = randn((T, B, H), dtype, device, gen)
        return inp

    def call(cell, inp):
        h, c = inp["h0"], inp["c0"]
        hs = []
        x = inp["x"]
        xs = x.unbind(0) if unbind else x
        for t in range(x.shape[0]):
            h, c = cell(xs[t], (h, c))
            hs.append(h)
        return [torch.stack(hs), c]

    def build_cls(get_cls, reference=False, compiled=False):
        def build(inp):
            mod = _load(get_cls()(I, H), inp["state"], inp["dtype"], inp["device"])
            if compiled:
                mod = _compile(mod)
            ctx = (lambda: _fastbig().backends.use("reference")) if reference else None
            return _module_run(inp, mod, call, bwd, ctx)
        return build

    def oracle(inp):
        mod = _load(nn.LSTMCell(I, H), inp["state"], torch.float64, inp["device"])
        return _module_run(inp, mod, call, bwd)()

    impls = [
        Impl("fastbig", "fastbig", build_cls(lambda: _fastbig().nn.LSTMCell)),
        Impl("fastbig-ref", "reference",
             build_cls(lambda: _fastbig().nn.LSTMCell, reference=True)),
        Impl("torch.nn", "baseline", build_cls(lambda: nn.LSTMCell)),
        Impl("compile(torch.nn)", "baseline", build_cls(lambda: nn.LSTMCell, compiled=True),
             compiled=True),
    ]
    name = f"LSTMCell loop {'train' if bwd else 'infer'} T{T} B{B} I{I} H{H}" + (" (x.unbind)" if unbind else "")
    return Case("lstm", name, mode, dict(T=T, B=B, I=I, H=H, cell_loop=True), make, oracle, impls,
                lstm_flops(T, B, I, H, 1, mode), "FLOP", eager="torch.nn", goals=goals or [],
                size=H * 1000 + B, compile_ok=compile_ok, compile_skip_reason=compile_skip_reason)


# ---- the tables ----------------------------------------------------------------------------
def cpu_cases(quick: bool) -> List[Case]:
    lstm_compile = _skip(quick)
    return [
        lstm_case(100, 64, 256, 256, 2, "fwd+bwd", goals=[Goal("fastbig", "torch.nn", 1.0)],
                  **lstm_compile),
        lstm_case(100, 64, 256, 256, 2, "infer", goals=[Goal("fastbig", "torch.nn", 1.0)],
                  **lstm_compile),
        lstm_cell_loop_case(100, 64, 256, 256, "fwd+bwd",
                            goals=[Goal("fastbig", "torch.nn", 1.3)], **lstm_compile),
        lstm_cell_loop_case(100, 64, 256, 256, "fwd+bwd", unbind=True, **lstm_compile),
        lstm_case(100, 1, 256, 256, 2, "infer", goals=[Goal("fastbig", "torch.nn", 1.0)],
                  name="latency B1 T100 I256 H256 L2", **lstm_compile),
    ]


def gpu_cases(quick: bool) -> List[Case]:
    hs = (256, 1024) if quick else (256, 512, 1024)
    bs = (64,) if quick else (1, 64, 256)
    out = []
    for H in hs:
        for B in bs:
            for mode in ("fwd+bwd", "infer"):
                out.append(lstm_case(100, B, H, H, 2, mode,
                                     goals=[Goal("fastbig", "torch.nn", 1.0)]))
    out.append(lstm_cell_loop_case(100, 64, 256, 256, "fwd+bwd",
                                   goals=[Goal("fastbig", "torch.nn", 1.3)]))
    out.append(lstm_cell_loop_case(100, 64, 256, 256, "fwd+bwd", unbind=True))
    return out


def smoke_cases() -> List[Case]:
    return [lstm_case(3, 2, 5, 7, 1, "fwd+bwd", goals=[Goal("fastbig", "torch.nn", 1.0)], **_smoke()),
            lstm_cell_loop_case(3, 2, 5, 7, "infer", **_smoke())]
