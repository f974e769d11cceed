"""fastbig.testing: the one home of the tolerances and the error measure; conftest's names are its."""
import math

import pytest
import torch

import conftest
from fastbig import testing


def test_conftest_names_are_fastbig_testing():
    for name in ("TOL", "TOL_TRITON_TF32", "tol", "rel_err", "assert_close", "randn"):
        assert getattr(conftest, name) is getattr(testing, name), name


def test_rel_err_tolerance_and_assert_close():
    ref = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert testing.rel_err(ref + torch.tensor([0.0, 5e-6], dtype=torch.float64), ref) == pytest.approx(1e-6)
    assert math.isinf(testing.rel_err(torch.tensor([float("nan"), 4.0]), ref))
    assert testing.tolerance(torch.float32, "cuda") == testing.TOL_TRITON_TF32 == testing.tol(torch.float32, tf32=True)
    assert testing.tolerance(torch.float32, torch.device("cpu")) == testing.TOL[torch.float32]
    with pytest.raises(AssertionError, match="relative error"):
        testing.assert_close(ref.float() * 1.001, ref)
    x = testing.randn(3, 4, dtype=torch.float16)
    assert x.dtype == torch.float16 and (x != 0).all()
    d = testing.to64({"x": x, "n": torch.tensor([1]), "sd": {"w": x.float()}})
    assert d["x"].dtype == d["sd"]["w"].dtype == d["dtype"] == torch.float64 and d["n"].dtype == torch.int64
