"""fastbig::lstm_cell, the foundation's end-to-end op: forward and backward vs the oracle."""
import pytest
import torch

import fastbig
from fastbig.reference.lstm import lstm_cell_pointwise
from conftest import DEVICES, assert_close, has_extension, randn

pytestmark = has_extension

SHAPES = [(1, 1), (3, 53), (64, 256), (17, 7), (2, 1023)]


def _dtypes(device):
    return [torch.float32, torch.float64] if device == "cpu" else [torch.float32, torch.float16, torch.bfloat16]


def _case(B, H, dtype, device):
    gates = randn(B, 4 * H, dtype=dtype, device=device, requires_grad=True, scale=2.0)
    c_prev = randn(B, H, dtype=dtype, device=device, requires_grad=True)
    return gates, c_prev


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,H", SHAPES)
def test_forward_backward_vs_float64_reference(device, B, H):
    for dtype in _dtypes(device):
        gates, c_prev = _case(B, H, dtype, device)
        with fastbig.backends.use("cpu" if device == "cpu" else "cuda"):
            h, c = fastbig.ops.lstm_cell_pointwise(gates, c_prev)
        g64 = gates.detach().double().requires_grad_()
        c64 = c_prev.detach().double().requires_grad_()
        h_ref, c_ref = lstm_cell_pointwise(g64, c64)
        assert h.dtype == dtype and c.dtype == dtype
        assert_close(h, h_ref, dtype, name="h")
        assert_close(c, c_ref, dtype, name="c")
        dh, dc = randn(B, H, dtype=dtype, device=device), randn(B, H, dtype=dtype, device=device)
        gg, gc = torch.autograd.grad((h, c), (gates, c_prev), (dh, dc))
        gg_ref, gc_ref = torch.autograd.grad((h_ref, c_ref), (g64, c64), (dh.double(), dc.double()))
        assert_close(gg, gg_ref, dtype, name="grad gates")
        assert_close(gc, gc_ref, dtype, name="grad c_prev")


def test_backward_with_only_grad_h_or_grad_c():
    gates, c_prev = _case(5, 9, torch.float64, "cpu")
    h, c = fastbig.ops.lstm_cell_pointwise(gates, c_prev)
    h_ref, c_ref = lstm_cell_pointwise(gates, c_prev)
    for out, ref in ((h, h_ref), (c, c_ref)):
        g1 = torch.autograd.grad(out.sum(), (gates, c_prev), retain_graph=True)
        g2 = torch.autograd.grad(ref.sum(), (gates, c_prev), retain_graph=True)
        for a, b in zip(g1, g2):
            assert_close(a, b, torch.float64)


def test_outputs_are_fresh_and_inputs_untouched():
    """The kernel must write every output element (outputs come from empty, never zeroed) and
    never write into the caller's tensors."""
    gates, c_prev = _case(7, 13, torch.float32, "cpu")
    g0, c0 = gates.detach().clone(), c_prev.detach().clone()
    h, c, act = torch.ops.fastbig.lstm_cell(gates.detach(), c_prev.detach())
    for t in (h, c, act):
        assert torch.isfinite(t).all()
    assert torch.equal(gates.detach(), g0) and torch.equal(c_prev.detach(), c0)


def test_nan_propagates_not_hidden():
    gates, c_prev = _case(2, 4, torch.float32, "cpu")
    g = gates.detach().clone()
    g[1, 2] = float("nan")  # the i gate of (1, 2)
    h, c = fastbig.ops.lstm_cell_pointwise(g, c_prev.detach())
    assert torch.isnan(h[1, 2]) and torch.isnan(c[1, 2])
    assert torch.isfinite(h[0]).all() and torch.isfinite(c[0]).all()


def test_extreme_preactivations_saturate_without_nan():
    gates = torch.tensor([[1e4, -1e4, 80.0, -80.0]], dtype=torch.float32)
    c_prev = torch.tensor([[0.5]])
    h, c = fastbig.ops.lstm_cell_pointwise(gates, c_prev)
    h_ref, c_ref = lstm_cell_pointwise(gates.double(), c_prev.double())
    assert_close(c, c_ref, torch.float32)
    assert_close(h, h_ref, torch.float32)


def test_non_contiguous_inputs():
    base = randn(8, 4 * 6 * 2, dtype=torch.float64)
    gates = base[:, ::2]  # stride 2 along the gate dim
    c_prev = randn(6, 8, dtype=torch.float64).t()
    assert not gates.is_contiguous() and not c_prev.is_contiguous()
    h, c = fastbig.ops.lstm_cell_pointwise(gates, c_prev)
    h_ref, c_ref = lstm_cell_pointwise(gates, c_prev)
    assert_close(h, h_ref, torch.float64)
    assert_close(c, c_ref, torch.float64)


def test_empty_batch():
    gates, c_prev = torch.randn(0, 12), torch.randn(0, 3)
    h, c = fastbig.ops.lstm_cell_pointwise(gates, c_prev)
    assert h.shape == (0, 3) and c.shape == (0, 3)


def test_gradcheck_float64():
    gates, c_prev = _case(3, 5, torch.float64, "cpu")
    assert torch.autograd.gradcheck(fastbig.ops.lstm_cell_pointwise, (gates, c_prev))


def test_opcheck():
    gates, c_prev = _case(4, 6, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.fastbig.lstm_cell.default, (gates, c_prev))
    act = torch.rand(4, 24)
    torch.library.opcheck(torch.ops.fastbig.lstm_cell_backward.default,
                          (torch.randn(4, 6), torch.randn(4, 6), act, torch.randn(4, 6), torch.randn(4, 6)))
    torch.library.opcheck(torch.ops.fastbig.lstm_cell_backward.default,
                          (None, torch.randn(4, 6), act, torch.randn(4, 6), torch.randn(4, 6)))


def test_torch_compile_fullgraph():
    gates, c_prev = _case(4, 6, torch.float32, "cpu")

    def f(g, c):
        h, c2 = fastbig.ops.lstm_cell_pointwise(g, c)
        return (h * 2).sum() + c2.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(gates, c_prev)
    ref = f(gates, c_prev)
    assert_close(out, ref, torch.float32)
    g1 = torch.autograd.grad(out, gates)[0]
    g2 = torch.autograd.grad(ref, gates)[0]
    assert_close(g1, g2, torch.float32)


def test_reference_backend_matches():
    gates, c_prev = _case(3, 11, torch.float64, "cpu")
    with fastbig.backends.use("reference"):
        h1, c1 = fastbig.ops.lstm_cell_pointwise(gates, c_prev)
    h2, c2 = fastbig.ops.lstm_cell_pointwise(gates, c_prev)
    assert_close(h2, h1, torch.float64)
    assert_close(c2, c1, torch.float64)


@pytest.mark.parametrize("args,exc,words", [
    ((torch.randn(2, 10), torch.randn(2, 3)), ValueError, "multiple of 4"),
    ((torch.randn(2, 12), torch.randn(2, 4)), ValueError, "c_prev must have shape (2, 3)"),
    ((torch.randn(2, 12), torch.randn(3, 3)), ValueError, "c_prev must have shape"),
    ((torch.randn(12), torch.randn(3)), ValueError, "gates must be 2-D"),
    ((torch.randn(2, 12), torch.randn(2, 3, dtype=torch.float64)), TypeError, "c_prev has dtype"),
    ((torch.randint(0, 3, (2, 12)), torch.randn(2, 3)), TypeError, "gates must have a floating dtype"),
    (([1.0] * 4, torch.randn(1, 1)), TypeError, "gates must be a torch.Tensor"),
])
def test_bad_inputs_name_the_argument(args, exc, words):
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        fastbig.ops.lstm_cell_pointwise(*args)


def test_old_op_names_are_aliases():
    """ops.lstm_cell (now lstm_cell_pointwise) and ops.lstm (now lstm_layer) keep working."""
    assert fastbig.ops.lstm_cell is fastbig.ops.lstm_cell_pointwise
    assert fastbig.ops.lstm is fastbig.ops.lstm_layer
    assert {"lstm", "lstm_cell", "lstm_layer", "lstm_cell_pointwise"} <= set(fastbig.ops.__all__)
    gates, c_prev = randn(2, 8), randn(2, 2)
    for a, b in zip(fastbig.ops.lstm_cell(gates, c_prev), fastbig.ops.lstm_cell_pointwise(gates, c_prev)):
        assert torch.equal(a, b)


def test_cpp_checks_guard_direct_op_calls():
    with pytest.raises(RuntimeError, match="c_prev must be"):
        torch.ops.fastbig.lstm_cell(torch.randn(2, 12), torch.randn(2, 5))


@pytest.mark.cuda
def test_cuda_matches_cpu():
    gates, c_prev = _case(33, 53, torch.float32, "cpu")
    h_cpu, c_cpu = fastbig.ops.lstm_cell_pointwise(gates, c_prev)
    h, c = fastbig.ops.lstm_cell_pointwise(gates.cuda(), c_prev.cuda())
    assert_close(h.cpu(), h_cpu.double(), torch.float32)
    assert_close(c.cpu(), c_cpu.double(), torch.float32)
