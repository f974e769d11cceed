"""Shared test machinery: markers, Triton mode, and fastbig.testing's tolerances, error measure
and inputs under their old names.

Triton kernels run on CPU tensors under TRITON_INTERPRET=1. It must be set before triton
kernels are defined, so it is set here, before fastbig is imported, whenever no GPU is present.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastbig  # noqa: E402

# The tolerances, the error measure and the inputs live in fastbig.testing (the benchmarks judge
# by them too); re-exported here for `from conftest import TOL, assert_close, ...`.
from fastbig.testing import (TOL, TOL_TRITON_TF32, assert_close, param_grad_errors, randn,  # noqa: E402,F401
                             rel_err, tol)

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
