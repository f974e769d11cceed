"""The measures fastbig's tests and benchmarks judge results by, in one place: the per-dtype
tolerances, the relative error against a float64 oracle, fresh random inputs, and the helpers
that make the oracle's float64 inputs.

Every result is compared to the reference computed in float64 from the same inputs, as
``||out - ref|| / ||ref||``, and held to ``tol(dtype)``.
"""
from __future__ import annotations

import math

import torch

__all__ = ["TOL", "TOL_TRITON_TF32", "tol", "tolerance", "rel_err", "assert_close", "param_grad_errors",
           "randn", "to64"]

# ||out - ref|| / ||ref||, ref computed in float64 from the same inputs.
TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}
# Triton's tl.dot in fp32 uses tf32 on GPUs (and cuDNN's convolutions do); the interpreter
# computes it in fp32 (ieee).
TOL_TRITON_TF32 = 3e-4


def tol(dtype, *, tf32=False):
    """The bound for results of ``dtype``; ``tf32``: float32 computed with TF32 dots."""
    if tf32 and dtype == torch.float32:
        return TOL_TRITON_TF32
    return TOL[dtype]


def tolerance(dtype, device) -> float:
    """The bound for results of ``dtype`` on ``device`` ("cpu" | "cuda"): float32 on a GPU is held
    to the TF32 bound."""
    return tol(dtype, tf32=getattr(device, "type", device) == "cuda")


def rel_err(out, ref):
    """Relative error in the 2-norm, computed in float64. NaN/inf anywhere gives inf."""
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if not torch.isfinite(out).all() or not torch.isfinite(ref).all():
        return float("inf")
    denom = ref.norm().item()
    num = (out - ref).norm().item()
    if denom == 0.0:
        return num
    return num / denom


def assert_close(out, ref, dtype=None, *, tf32=False, name="output", factor=1.0):
    """Assert rel_err(out, ref) <= tol(dtype) * factor (dtype: out's by default); returns the error."""
    dtype = dtype or out.dtype
    err = rel_err(out, ref)
    bound = tol(dtype, tf32=tf32) * factor
    assert err <= bound, f"{name}: relative error {err:.3e} > {bound:.1e} ({dtype})"
    return err


def param_grad_errors(model: torch.nn.Module, twin: torch.nn.Module) -> dict:
    """{name: relative error} of each parameter's gradient in ``model`` against the same-named
    parameter of ``twin`` (the stock or float64 model, after the same backward).

    A gradient that is zero in exact arithmetic (the key bias of softmax attention) has no
    relative error to speak of: where the twin's gradient norm is under 1e-6 of all its
    gradients' norm, the difference is measured against that total norm instead. NaN/inf give
    inf. A gradient on one side only fails (an assertion naming the parameter)."""
    tp = dict(twin.named_parameters())
    total = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in tp.values()
                           if p.grad is not None)).item()
    errs = {}
    for name, p in model.named_parameters():
        r = tp[name].grad
        if r is None:
            assert p.grad is None or p.grad.abs().max() == 0, f"{name} has a gradient, the twin none"
            continue
        assert p.grad is not None, f"no gradient for {name}"
        if r.double().norm().item() < 1e-6 * total:
            d = (p.grad.double() - r.double()).norm().item()
            errs[name] = d / total if math.isfinite(d) else float("inf")
        else:
            errs[name] = rel_err(p.grad, r)
    return errs


def randn(*shape, dtype=torch.float32, device="cpu", requires_grad=False, scale=1.0, generator=None):
    """Fresh random inputs, never zeros: drawn in float64 on the CPU, then cast and moved."""
    t = torch.randn(*shape, dtype=torch.float64, generator=generator) * scale
    t = t.to(device=device, dtype=dtype)
    if requires_grad:
        t.requires_grad_(True)
    return t


def to64(inputs: dict) -> dict:
    """The same inputs in float64 (floating tensors and, recursively, dicts such as state dicts),
    for the oracle; ``dtype`` set to float64."""
    def conv(v):
        if isinstance(v, torch.Tensor):
            if v.is_floating_point():
                return v.detach().to(torch.float64).requires_grad_(v.requires_grad)
            return v
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    out = {k: conv(v) for k, v in inputs.items()}
    out["dtype"] = torch.float64
    return out
