"""What every op's cases are made of: the Case/Impl/Goal types and the op-independent helpers.

A :class:`Case` makes its inputs (fresh random, never zeros) for a device and dtype, knows its
float64 oracle (plain torch, computed from the same inputs cast to float64), its amount of work
(FLOPs or bytes) and its goals. Each :class:`Impl` builds, from those inputs, a thunk that runs
the implementation once and returns the tensors to check (outputs, then gradients), in the
oracle's order. A thunk never writes into the inputs (the harness checks).

An implementation that cannot run here (no CUDA, transformers not installed, an SDPA backend or
torch.compile path this torch lacks) raises :class:`NotAvailable`, and the harness reports "not
available" instead of failing.

The op modules import from here, never from the package's __init__ (the registry).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn

# The bounds of the tests (fp32 on a GPU: cuDNN convolutions and Triton's tl.dot use TF32).
from ...testing import TOL, TOL_TRITON_TF32, to64, tolerance  # noqa: F401 (re-exported)
from ... import testing


class NotAvailable(Exception):
    """This implementation cannot run here (a backend missing: no CUDA, transformers not
    installed, an SDPA backend or torch.compile path this torch lacks, ...)."""


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


# ---- what the tables share -----------------------------------------------------------------
QUICK_COMPILE = "--quick: torch.compile skipped here (a CPU compile takes ~20 s); " \
                "--quick compiles in the conv 1x1 inference case only"


def _skip(quick, keep=False):
    """The CPU tables' compile switch: --quick skips torch.compile, except where ``keep``."""
    if quick and not keep:
        return dict(compile_ok=False, compile_skip_reason=QUICK_COMPILE)
    return {}


def _smoke():
    """The smoke tables' compile switch: never (tiny shapes, every code path, in a second)."""
    return dict(compile_ok=False, compile_skip_reason="smoke run: no torch.compile")
