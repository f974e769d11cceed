"""Shared test machinery: tolerances in one place, the error measure, markers, Triton mode.

Triton kernels run on CPU tensors under TRITON_INTERPRET=1. It must be set before triton
kernels are defined, so it is set here, before fastbig is imported, whenever no GPU is present.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastbig  # noqa: E402

# ||out - ref|| / ||ref||, ref computed in float64 from the same inputs.
TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}
# Triton's tl.dot in fp32 uses tf32 on GPUs; the interpreter computes it in fp32 (ieee).
TOL_TRITON_TF32 = 3e-4


def tol(dtype, *, tf32=False):
    if tf32 and dtype == torch.float32:
        return TOL_TRITON_TF32
    return TOL[dtype]


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
    dtype = dtype or out.dtype
    err = rel_err(out, ref)
    bound = tol(dtype, tf32=tf32) * factor
    assert err <= bound, f"{name}: relative error {err:.3e} > {bound:.1e} ({dtype})"
    return err


def randn(*shape, dtype=torch.float32, device="cpu", requires_grad=False, scale=1.0, generator=None):
    """Fresh random inputs, never zeros."""
    t = torch.randn(*shape, dtype=torch.float64, generator=generator) * scale
    t = t.to(device=device, dtype=dtype)
    if requires_grad:
        t.requires_grad_(True)
    return t


HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def interpret_triton():
    """Run Triton kernels here: on CPU tensors through the interpreter when there is no GPU."""
    if not HAS_CUDA and not fastbig.backends.triton_interpret():
        pytest.skip("TRITON_INTERPRET=1 was not set before triton kernels were defined")
    with fastbig.backends.use("triton"):
        yield


has_extension = pytest.mark.skipif(not fastbig.build_info()["loaded"],
                                   reason="fastbig._C is not built")
