"""fastbig.testing: the one home of the tolerances and the error measure; conftest's names are its."""
import math

import pytest
import torch

import conftest
from fastbig import testing


def test_conftest_names_are_fastbig_testing():
    for name in ("TOL", "TOL_TRITON_TF32", "tol", "rel_err", "assert_close", "param_grad_errors", "randn"):
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


def test_param_grad_errors():
    """Per-parameter relative error; a gradient zero in exact arithmetic is measured against the
    total norm; NaN gives inf; a gradient on one side only fails naming the parameter."""
    torch.manual_seed(0)
    twin = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).double()
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model.load_state_dict(twin.state_dict())
    x = torch.randn(5, 3, dtype=torch.float64)
    twin(x).sum().backward()
    model(x.float()).sum().backward()
    errs = testing.param_grad_errors(model, twin)
    assert set(errs) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert max(errs.values()) < testing.TOL[torch.float32]
    # the last bias's gradient is the batch size (5) per output: perturb it by 1e-3 relative
    model[1].bias.grad += 5e-3
    assert testing.param_grad_errors(model, twin)["1.bias"] == pytest.approx(1e-3, rel=1e-3)
    # zero in the twin: measured against the total norm
    twin[0].bias.grad.zero_()
    model[0].bias.grad.fill_(1e-3)
    total = math.sqrt(sum((p.grad ** 2).sum().item() for p in twin.parameters()))
    assert testing.param_grad_errors(model, twin)["0.bias"] == pytest.approx(2e-3 / total, rel=1e-5)
    model[0].weight.grad[0, 0] = float("nan")
    assert math.isinf(testing.param_grad_errors(model, twin)["0.weight"])
    model[1].weight.grad = None
    with pytest.raises(AssertionError, match="no gradient for 1.weight"):
        testing.param_grad_errors(model, twin)
