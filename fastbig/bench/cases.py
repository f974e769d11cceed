"""The one table of benchmark cases, shared by the harness (``fastbig bench``) and the
pytest-benchmark suites in bench/.

A :class:`Case` makes its inputs (fresh random, never zeros) for a device and dtype, knows its
float64 oracle (plain torch, computed from the same inputs cast to float64), its amount of work
(FLOPs or bytes) and its goals. Each :class:`Impl` builds, from those inputs, a thunk that runs
the implementation once and returns the tensors to check (outputs, then gradients), in the
oracle's order. A thunk never writes into the inputs (the harness checks).

An implementation whose fastbig API is not there yet (AttributeError, ImportError) raises
:class:`NotAvailable`, and the harness reports "not available" instead of failing.

Work counts (the issue's): attention forward 4*B*H*Sq*Sk*D, halved when causal, backward 2.5x
the forward; LSTM 8*B*H*(I+H) per step, layer and direction forward, backward 2x that; conv
2*N*K*C*R*S*P*Q/groups, backward 2x the forward; BN+activation alone is memory bound: bytes of
its minimal traffic (forward reads z and writes y, backward reads dy and z and writes dz).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# The bounds of the tests (fp32 on a GPU: cuDNN convolutions and Triton's tl.dot use TF32).
from ..testing import TOL, TOL_TRITON_TF32, to64, tolerance  # noqa: F401 (re-exported)
from .. import testing

OPS = ("attention", "lstm", "conv_bn_relu", "models")
# asked for by name only, not part of "all": transformers models (fastbig/bench/hf_cases.py)
EXTRA_OPS = ("transformers",)


class NotAvailable(Exception):
    """This implementation cannot run here (API not there yet, backend missing, ...)."""


def need(obj, *names):
    """getattr chain that turns a missing fastbig API into NotAvailable."""
    cur = obj
    path = getattr(obj, "__name__", type(obj).__name__)
    for n in names:
        try:
            cur = getattr(cur, n)
        except (AttributeError, ImportError) as e:
            raise NotAvailable(f"{path}.{n} is not there yet ({type(e).__name__})") from None
        path = f"{path}.{n}"
    return cur


def _fastbig():
    try:
        import fastbig
    except Exception as e:  # pragma: no cover - the package itself is broken
        raise NotAvailable(f"import fastbig failed: {type(e).__name__}: {e}") from None
    return fastbig


@dataclass
class Impl:
    name: str
    kind: str                      # "fastbig" | "reference" | "baseline"
    build: Callable[[dict], Callable[[], List[torch.Tensor]]]
    compiled: bool = False         # torch.compile: compiled at its first call, timed after
    devices: Sequence[str] = ("cpu", "cuda")
    note: str = ""


@dataclass
class Goal:
    impl: str                      # the implementation that must meet it (fastbig)
    vs: Optional[str]              # ratio t(vs)/t(impl) >= ratio; None for a memory goal
    ratio: float = 1.0
    max_bytes: Optional[int] = None

    def label(self) -> str:
        if self.vs is None:
            return f"peak<={self.max_bytes / 2**20:g}MiB"
        return f">={self.ratio:g}x {self.vs}"


@dataclass
class Case:
    op: str
    name: str
    mode: str                      # "fwd" | "fwd+bwd" | "infer"
    params: dict
    make: Callable[[str, torch.dtype, torch.Generator], dict]
    oracle: Callable[[dict], List[torch.Tensor]]
    impls: List[Impl]
    work: float                    # FLOPs (unit "FLOP") or bytes (unit "B") of one call
    unit: str = "FLOP"
    work_per_element: bool = False  # work counts elements: bytes = work * the run's dtype itemsize
    eager: str = "eager"           # the implementation "vs eager" divides by
    goals: List[Goal] = field(default_factory=list)
    size: float = 0.0              # x axis of the plot
    compile_ok: bool = True        # False: torch.compile impls are skipped (reason below)
    compile_skip_reason: str = ""
    note: str = ""

    @property
    def key(self) -> str:
        return f"{self.op}/{self.name}"

    def work_for(self, dtype: torch.dtype) -> float:
        """FLOPs, or bytes moved by one call at this dtype."""
        if self.work_per_element:
            return self.work * torch.empty(0, dtype=dtype).element_size()
        return self.work


# ---- helpers -------------------------------------------------------------------------------
def randn(shape, dtype, device, gen, scale=1.0, requires_grad=False):
    """fastbig.testing.randn with the cases' positional arguments (a shape, the run's generator)."""
    return testing.randn(*shape, dtype=dtype, device=device, generator=gen, scale=scale,
                         requires_grad=requires_grad)


# Half-width of the band around the ReLU kink where grad_out is set to 0 (see kink_safe_grad).
KINK_MARGIN = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def kink_safe_grad(grad_out: torch.Tensor, pre_act64: torch.Tensor, dtype) -> torch.Tensor:
    """grad_out with zeros where the float64 pre-activation is within KINK_MARGIN of ReLU's kink.

    A value that close to 0 may land on either side of the kink in low precision, and one such
    flip moves a BatchNorm gradient by ~1/sqrt(elements per channel) (about 1e-3 here): no
    tolerance tells that apart from a wrong kernel. With grad_out 0 there, relu' times grad_out
    is 0 on both sides, and the gradient is well defined at the dtype's precision. The
    tolerance itself is not touched; ~0.01% (fp32) of grad_out becomes 0.
    """
    near = pre_act64.abs().to(grad_out.device) < KINK_MARGIN[dtype]
    return grad_out.masked_fill(near, 0.0)


def fwd_bwd(outputs: Sequence[torch.Tensor], wrt: Sequence[torch.Tensor],
            grad_outputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Outputs, then the gradients of sum(out * grad_out) w.r.t. ``wrt`` (no .grad written)."""
    n = len(grad_outputs)
    grads = torch.autograd.grad(list(outputs[:n]), list(wrt), list(grad_outputs))
    return [o.detach() for o in outputs] + list(grads)


def _compile(fn):
    return torch.compile(fn, dynamic=False)


@contextlib.contextmanager
def _nothing():
    yield


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    be = {"math": "MATH", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
          "cudnn": "CUDNN_ATTENTION"}[name]
    if not hasattr(SDPBackend, be):
        raise NotAvailable(f"torch has no SDPBackend.{be}")
    return lambda: sdpa_kernel([getattr(SDPBackend, be)])


# ---- attention -----------------------------------------------------------------------------
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
        fb = _fastbig()
        att = need(fb, "ops", "attention")
        return lambda q, k, v: att(q, k, v, causal=causal)

    def ref_call(inp):
        fb = _fastbig()
        att = need(fb, "ops", "attention")
        use = fb.backends.use

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


# ---- lstm ----------------------------------------------------------------------------------
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


def _load(mod: nn.Module, state: dict, dtype, device) -> nn.Module:
    mod = mod.to(device=device, dtype=dtype)
    mod.load_state_dict({k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v
                         for k, v in state.items()})
    return mod


def _module_run(inp, mod, call, bwd, ctx=None, check_grads=True):
    """Thunk: call(mod, inp) -> outputs; with bwd, grads w.r.t. inp['x'] + parameters
    (computed always, returned for the check unless ``check_grads`` is False)."""
    params = [p for p in mod.parameters()] if bwd else []

    def run():
        with (ctx() if ctx is not None else _nothing()):
            if bwd:
                outs = call(mod, inp)
                res = fwd_bwd(outs, [inp["x"]] + params, [inp["grad_out"]])
                return res if check_grads else res[:len(outs)]
            with torch.no_grad():
                return [o.detach() for o in call(mod, inp)]
    return run


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
            cls = need(fb, "nn", "LSTM")
            mod = _load(cls(I, H, layers), inp["state"], inp["dtype"], inp["device"])
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
        Impl("fastbig", "fastbig", build_cls(lambda: need(_fastbig(), "nn", "LSTMCell"))),
        Impl("fastbig-ref", "reference",
             build_cls(lambda: need(_fastbig(), "nn", "LSTMCell"), reference=True)),
        Impl("torch.nn", "baseline", build_cls(lambda: nn.LSTMCell)),
        Impl("compile(torch.nn)", "baseline", build_cls(lambda: nn.LSTMCell, compiled=True),
             compiled=True),
    ]
    name = f"LSTMCell loop {'train' if bwd else 'infer'} T{T} B{B} I{I} H{H}" + (" (x.unbind)" if unbind else "")
    return Case("lstm", name, mode, dict(T=T, B=B, I=I, H=H, cell_loop=True), make, oracle, impls,
                lstm_flops(T, B, I, H, 1, mode), "FLOP", eager="torch.nn", goals=goals or [],
                size=H * 1000 + B, compile_ok=compile_ok, compile_skip_reason=compile_skip_reason)


# ---- conv + bn + relu ----------------------------------------------------------------------
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
            cls = need(fb, "nn", "ConvBnReLU2d")
            mod = prep(_load(cls(C, K, ks, padding=ks // 2), inp["state"], inp["dtype"],
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


def _fastbig_bn_act():
    """fastbig's BN+activation op on a given conv output, under whichever name it has."""
    ops = need(_fastbig(), "ops")
    f = getattr(ops, "bn_act", None)
    if f is None:
        raise NotAvailable("fastbig.ops.bn_act is not there yet")
    return f


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
        op = _fastbig_bn_act()
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


# ---- models --------------------------------------------------------------------------------
# name -> (class in fastbig.models, constructor kwargs, input shape after the batch, batch on CPU)
MODEL_SPECS = {
    "MNISTNet": ("MNISTNet", dict(image_size=28), (1, 28, 28), 64),
    "LSTMClassifier": ("LSTMClassifier", dict(input_size=32, hidden_size=128, num_layers=2,
                                              num_classes=10), (50, 32), 32),
    "ResNet-small": ("ResNet", dict(layers=(1, 1, 1, 1), width=16, num_classes=10,
                                    small_input=True), (3, 32, 32), 16),
}
QUICK_MODELS = ("MNISTNet", "LSTMClassifier")


def _no_dropout(m: nn.Module) -> nn.Module:
    """Dropout p -> 0, so the fused, unfused and float64 runs are comparable (keys unchanged)."""
    for mod in m.modules():
        if isinstance(mod, nn.modules.dropout._DropoutNd):
            mod.p = 0.0
        elif isinstance(getattr(mod, "dropout", None), float):     # nn.LSTM and its twins
            mod.dropout = 0.0
    return m


def model_case(model_name, mode, *, batch=None, compile_ok=True, compile_skip_reason="",
               kwargs=None, shape=None) -> Case:
    cls_name, kw, shp, default_b = MODEL_SPECS[model_name]
    kwargs = kw if kwargs is None else kwargs
    shape = shp if shape is None else shape
    B = batch or default_b
    bwd = mode == "fwd+bwd"

    def cls():
        return need(_fastbig(), "models", cls_name)

    def model(fused, dtype, device, state):
        if state is None:
            raise NotAvailable(f"fastbig.models.{cls_name} is not there yet")
        m = _no_dropout(_load(cls()(fused=fused, **kwargs), state, dtype, device))
        return m.train() if bwd else m.eval()

    def make(device, dtype, gen):
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)             # the model's own init, reproducibly
                ref = cls()(fused=False, **kwargs)
            state = {k: v.detach().to(torch.float64).clone() if v.is_floating_point() else v.clone()
                     for k, v in ref.state_dict().items()}
        except NotAvailable:
            state = None
        inp = {"x": randn((B,) + tuple(shape), dtype, device, gen, requires_grad=bwd),
               "state": state, "dtype": dtype, "device": device}
        if bwd and state is not None:
            with torch.no_grad():
                out = model(False, torch.float64, device, state)(inp["x"].detach().double())
            inp["grad_out"] = randn(tuple(out.shape), dtype, device, gen)
        return inp

    def call(mod, inp):
        return [mod(inp["x"])]

    def build(fused, reference=False, compiled=False):
        def b(inp):
            mod = model(fused, inp["dtype"], inp["device"], inp["state"])
            if compiled:
                mod = _compile(mod)
            ctx = (lambda: _fastbig().backends.use("reference")) if reference else None
            return _module_run(inp, mod, call, bwd, ctx, check_grads=False)
        return b

    def oracle(inp):
        mod = model(False, torch.float64, inp["device"], inp["state"])
        return _module_run(inp, mod, call, bwd, check_grads=False)()

    impls = [
        Impl("fastbig", "fastbig", build(True), note="fused=True"),
        Impl("fastbig-ref", "reference", build(True, reference=True)),
        Impl("torch.nn", "baseline", build(False), note="fused=False"),
        Impl("compile(torch.nn)", "baseline", build(False, compiled=True), compiled=True),
    ]
    name = f"{model_name} {'train step' if bwd else 'inference'} B{B}"
    c = Case("models", name, mode, dict(model=model_name, B=B, **kwargs), make, oracle, impls, 0.0,
             "", eager="torch.nn", size=B, compile_ok=compile_ok,
             compile_skip_reason=compile_skip_reason)
    if bwd:
        c.note = ("train step: forward + backward timed; the check compares the logits only "
                  "(ReLU kinks deep in a net make fp32 gradients vs float64 ill-conditioned); "
                  "dropout p set to 0")
    else:
        c.note = "dropout p set to 0 (eval mode anyway)"
    return c


# ---- the table -----------------------------------------------------------------------------
QUICK_COMPILE = "--quick: torch.compile skipped here (a CPU compile takes ~20 s); " \
                "--quick compiles in the conv 1x1 inference case only"


def get_cases(op: str = "all", device: str = "cpu", *, quick: bool = False,
              smoke: bool = False) -> List[Case]:
    """The cases of ``op`` ('all' for every op) on ``device``; quick/smoke are smaller runs."""
    ops = OPS if op == "all" else (op,)
    for o in ops:
        if o not in OPS + EXTRA_OPS:
            raise ValueError(f"op: expected one of {OPS + EXTRA_OPS + ('all',)}, got {o!r}")
    cases: List[Case] = []
    for o in ops:
        if o == "transformers":
            from .hf_cases import hf_cases
            cases += hf_cases(device, quick=quick, smoke=smoke)
        elif smoke:
            cases += _smoke_cases(o)
        elif device == "cuda":
            cases += _gpu_cases(o, quick)
        else:
            cases += _cpu_cases(o, quick)
    return cases


def _skip(quick, keep=False):
    if quick and not keep:
        return dict(compile_ok=False, compile_skip_reason=QUICK_COMPILE)
    return {}


def _cpu_cases(op, quick) -> List[Case]:
    if op == "attention":
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
    if op == "lstm":
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
    if op == "conv_bn_relu":
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
    if op == "models":
        return [model_case(m, mode, **_skip(quick)) for m in (QUICK_MODELS if quick else MODEL_SPECS)
                for mode in ("fwd+bwd", "infer")]
    raise ValueError(op)


GPU_COMPILE_SEQS = ("torch.compile (eager, FlexAttention) runs at S=1024 and S=8192 only: one "
                    "compile per case would take most of the run")


def _gpu_cases(op, quick) -> List[Case]:
    if op == "attention":
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
    if op == "lstm":
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
    if op == "conv_bn_relu":
        N = 8 if quick else 32
        return [
            conv_case(N, 64, 64, 56, ks, mode, goals=[Goal("fastbig", "torch.nn", g)])
            for ks, g_train, g_inf in ((3, 1.1, 1.25), (1, 1.25, 1.25))
            for mode, g in (("fwd+bwd", g_train), ("infer", g_inf))
        ] + [bn_act_case(N, 64, 56, goals=[Goal("fastbig", "eager", 2.0)])]
    if op == "models":
        return [model_case(m, mode, batch=256) for m in MODEL_SPECS for mode in ("fwd+bwd", "infer")]
    raise ValueError(op)


def _smoke_cases(op) -> List[Case]:
    """Tiny shapes for the test suite: every code path, in a second."""
    no = dict(compile_ok=False, compile_skip_reason="smoke run: no torch.compile")
    if op == "attention":
        return [attention_case(1, 2, 17, 16, True, "fwd+bwd", goals=[Goal("fastbig", "sdpa", 0.95)],
                               **no)]
    if op == "lstm":
        return [lstm_case(3, 2, 5, 7, 1, "fwd+bwd", goals=[Goal("fastbig", "torch.nn", 1.0)], **no),
                lstm_cell_loop_case(3, 2, 5, 7, "infer", **no)]
    if op == "conv_bn_relu":
        return [conv_case(2, 3, 4, 9, 3, "fwd+bwd", **no), bn_act_case(2, 3, 5, **no)]
    if op == "models":
        return [model_case("MNISTNet", "fwd+bwd", batch=2, kwargs=dict(image_size=8),
                           shape=(1, 8, 8), **no)]
    raise ValueError(op)
