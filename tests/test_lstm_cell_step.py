"""fastbig::lstm_cell_step, one whole nn.LSTMCell step (GEMMs + cell, one autograd node): forward
and every gradient vs the float64 oracle, on the fused float32 CPU kernel (its thread splits
included) and on the ATen fallback (float64, other dtypes)."""
import contextlib

import pytest
import torch

import fastbig
from fastbig.reference.lstm import lstm_cell as ref_cell
from conftest import assert_close, has_extension, randn

pytestmark = has_extension
F32, F64 = torch.float32, torch.float64


@pytest.fixture
def threads():
    """Run a test body at a given intra-op thread count, restored afterwards."""
    n = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(n)


def _case(B, I, H, dtype=F32, bias=(True, True), scale=1.0):
    x = randn(B, I, dtype=dtype, requires_grad=True)
    h = randn(B, H, dtype=dtype, requires_grad=True, scale=0.5)
    c = randn(B, H, dtype=dtype, requires_grad=True, scale=0.5)
    w_ih = randn(4 * H, I, dtype=dtype, requires_grad=True, scale=scale / I ** 0.5)
    w_hh = randn(4 * H, H, dtype=dtype, requires_grad=True, scale=scale / H ** 0.5)
    b_ih = randn(4 * H, dtype=dtype, requires_grad=True, scale=0.3) if bias[0] else None
    b_hh = randn(4 * H, dtype=dtype, requires_grad=True, scale=0.3) if bias[1] else None
    return [x, h, c, w_ih, w_hh, b_ih, b_hh]


def _check_vs_f64(args, grads=("h", "c")):
    dtype = args[0].dtype
    B, H = args[1].shape
    with fastbig.backends.use("cpu"):
        h, c = fastbig.ops.lstm_cell_step(*args)
    a64 = [t.detach().double().requires_grad_() if t is not None else None for t in args]
    h64, c64 = ref_cell(*a64)
    assert h.dtype == dtype and c.dtype == dtype
    assert_close(h, h64, dtype, name="h")
    assert_close(c, c64, dtype, name="c")
    gh, gc = randn(B, H, dtype=dtype), randn(B, H, dtype=dtype)
    outs, outs64, gouts = [], [], []
    if "h" in grads:
        outs, outs64, gouts = outs + [h], outs64 + [h64], gouts + [gh]
    if "c" in grads:
        outs, outs64, gouts = outs + [c], outs64 + [c64], gouts + [gc]
    want = [i for i, t in enumerate(args) if t is not None and t.requires_grad]
    g = torch.autograd.grad(outs, [args[i] for i in want], gouts)
    g64 = torch.autograd.grad(outs64, [a64[i] for i in want], [t.double() for t in gouts])
    names = ["grad input", "grad hx", "grad cx", "grad w_ih", "grad w_hh", "grad b_ih", "grad b_hh"]
    for i, a, b in zip(want, g, g64):
        assert a.dtype == dtype
        assert_close(a, b, dtype, name=names[i])


# (B, I, H, threads): the fused kernel splits hidden units in 16-unit blocks between threads
# (at most one per 64 units, none below 2^18 B*H*(I+H)): odd H puts a tail in a thread's range.
@pytest.mark.parametrize("B,I,H,nt", [
    (1, 1, 1, 1), (3, 5, 7, 1), (1, 17, 53, 2), (64, 256, 256, 2), (13, 70, 130, 2),
    (9, 150, 200, 3), (64, 256, 256, 1), (2, 300, 1023, 2)])
def test_float32_fused_vs_float64(B, I, H, nt, threads):
    threads(nt)
    _check_vs_f64(_case(B, I, H))


@contextlib.contextmanager
def _nan_poisoned_empty():
    """Every empty tensor (the kernels' outputs and gradients included) starts as NaN."""
    old = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old[0])
        torch.utils.deterministic.fill_uninitialized_memory = old[1]


@pytest.mark.parametrize("B,I,H,nt", [(13, 70, 130, 2), (9, 150, 200, 3), (5, 1, 257, 4)])
def test_every_output_element_written(B, I, H, nt, threads):
    """Outputs come from empty, NaN-filled here: a unit or column no thread covers would show."""
    threads(nt)
    with _nan_poisoned_empty():
        _check_vs_f64(_case(max(B, 1), I, H))


@pytest.mark.parametrize("bias", [(False, False), (True, False), (False, True)])
def test_bias_variants(bias):
    _check_vs_f64(_case(13, 70, 130, bias=bias))
    _check_vs_f64(_case(3, 4, 5, dtype=F64, bias=bias))


@pytest.mark.parametrize("dtype", [F64, torch.bfloat16, torch.float16])
def test_other_dtypes_take_the_aten_path(dtype):
    _check_vs_f64(_case(6, 9, 11, dtype=dtype))


@pytest.mark.parametrize("grads", [("h",), ("c",)])
def test_only_one_output_gradient(grads):
    _check_vs_f64(_case(13, 70, 130), grads=grads)
    _check_vs_f64(_case(3, 4, 5, dtype=F64), grads=grads)


def test_frozen_weights_and_constant_input():
    """need_input_grad / need_weight_grad false skip those GEMMs; the rest stays exact."""
    for dtype in (F32, F64):
        args = _case(13, 70, 130, dtype=dtype)
        args[0].requires_grad_(False)
        _check_vs_f64(args)
        args = _case(13, 70, 130, dtype=dtype)
        for t in args[3:]:
            t.requires_grad_(False)
        _check_vs_f64(args)


def test_non_contiguous_inputs():
    B, I, H = 13, 70, 130
    args = _case(B, I, H)
    xt = randn(I, B).t().requires_grad_()               # transposed view
    w_hh_t = randn(H, 4 * H, scale=H ** -0.5).t().requires_grad_()
    c_wide = randn(B, 2 * H, scale=0.5)[:, ::2].requires_grad_()
    _check_vs_f64([xt, args[1], c_wide, args[3], w_hh_t, args[5], args[6]])


def test_inputs_and_grads_untouched():
    """No write into the caller's tensors: inputs, and the incoming gradients (the kernel's
    running dc starts as a copy of grad_c)."""
    args = [t.detach() for t in _case(13, 70, 130)]
    before = [t.clone() for t in args]
    h, c, act = torch.ops.fastbig.lstm_cell_step(*args)
    gh, gc = randn(13, 130), randn(13, 130)
    gh0, gc0 = gh.clone(), gc.clone()
    torch.ops.fastbig.lstm_cell_step_backward(gh, gc, *args[:5], c, act, True, True)
    for t, t0 in zip(args + [gh, gc], before + [gh0, gc0]):
        assert torch.equal(t, t0)


def test_nan_propagates():
    args = [t.detach() for t in _case(13, 70, 130)]
    args[0][3, 5] = float("nan")
    h, c = fastbig.ops.lstm_cell_step(*args)
    assert torch.isnan(h[3]).all() and torch.isnan(c[3]).all()
    assert torch.isfinite(h[:3]).all() and torch.isfinite(h[4:]).all()


def test_empty_batch():
    args = _case(0, 5, 7)
    h, c = fastbig.ops.lstm_cell_step(*args)
    assert h.shape == (0, 7) and c.shape == (0, 7)
    g = torch.autograd.grad((h.sum() + c.sum()), args[3])[0]
    assert g.shape == (28, 5) and not g.any()


def test_gradcheck_float64():
    args = _case(3, 4, 5, dtype=F64)
    assert torch.autograd.gradcheck(fastbig.ops.lstm_cell_step, tuple(args))


def test_opcheck():
    for B, I, H in ((4, 6, 5), (13, 70, 130)):
        args = [t.detach() for t in _case(B, I, H)]
        torch.library.opcheck(torch.ops.fastbig.lstm_cell_step.default, tuple(args))
        torch.library.opcheck(torch.ops.fastbig.lstm_cell_step.default, tuple(args[:5]) + (None, None))
        h, c, act = torch.ops.fastbig.lstm_cell_step(*args)
        for gh, gc, ni, nw in ((randn(B, H), randn(B, H), True, True), (None, randn(B, H), False, True),
                               (randn(B, H), None, True, False)):
            torch.library.opcheck(torch.ops.fastbig.lstm_cell_step_backward.default,
                                  (gh, gc, *args[:5], c, act, ni, nw))


def test_torch_compile_fullgraph_module():
    cell = fastbig.nn.LSTMCell(6, 5)
    x, h, c = randn(3, 6), randn(3, 5), randn(3, 5)

    def f(x, h, c):
        h1, c1 = cell(x, (h, c))
        h2, c2 = cell(x, (h1, c1))
        return (h2 * 2).sum() + c2.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, ref = compiled(x, h, c), f(x, h, c)
    assert_close(out, ref.double(), F32)
    g1 = torch.autograd.grad(out, cell.weight_hh)[0]
    g2 = torch.autograd.grad(f(x, h, c), cell.weight_hh)[0]
    assert_close(g1, g2.double(), F32)


def test_double_backward_refused_clearly():
    args = _case(3, 4, 5, dtype=F64)
    h, c = fastbig.ops.lstm_cell_step(*args)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(h.sum(), args[0], create_graph=True)


def test_reference_backend_matches():
    args = _case(3, 4, 5, dtype=F64)
    with fastbig.backends.use("reference"):
        h1, c1 = fastbig.ops.lstm_cell_step(*args)
    h2, c2 = fastbig.ops.lstm_cell_step(*args)
    assert_close(h2, h1, F64)
    assert_close(c2, c1, F64)


def _bad(B=2, I=3, H=4):
    return [torch.randn(B, I), torch.randn(B, H), torch.randn(B, H), torch.randn(4 * H, I),
            torch.randn(4 * H, H), torch.randn(4 * H), torch.randn(4 * H)]


def _with(i, t):
    a = _bad()
    a[i] = t
    return a


@pytest.mark.parametrize("args,exc,words", [
    (_with(0, torch.randn(2, 5)), RuntimeError, "input has inconsistent input_size: got 5 expected 3"),
    (_with(1, torch.randn(3, 4)), ValueError, r"h must have shape \(2, 4\), got \(3, 4\)"),
    (_with(2, torch.randn(2, 5)), ValueError, r"c must have shape \(2, 4\)"),
    (_with(3, torch.randn(15, 3)), ValueError, "w_ih must be \\[4\\*hidden_size, input_size\\]"),
    (_with(4, torch.randn(16, 5)), ValueError, r"w_hh must have shape \(16, 4\)"),
    (_with(5, torch.randn(15)), ValueError, r"b_ih must have shape \(16,\)"),
    (_with(6, torch.randn(16, dtype=F64)), TypeError, "b_hh has dtype torch.float64"),
    (_with(1, torch.randn(2, 4, dtype=F64)), TypeError, "h has dtype torch.float64"),
    (_with(0, torch.randint(0, 3, (2, 3))), TypeError, "x must have a floating dtype"),
    (_with(0, torch.randn(3)), ValueError, "x must be 2-D"),
    (_with(3, "w"), TypeError, "w_ih must be a torch.Tensor"),
])
def test_bad_inputs_name_the_argument(args, exc, words):
    with pytest.raises(exc, match=words):
        fastbig.ops.lstm_cell_step(*args)


@pytest.mark.parametrize("i,t,words", [
    (0, torch.randn(2, 5), "input must be \\[batch, 3\\]"),
    (1, torch.randn(2, 5), "hx must be \\[2, 4\\]"),
    (2, torch.randn(3, 4), "cx must be \\[2, 4\\]"),
    (4, torch.randn(16, 3), "w_hh must be \\[16, 4\\]"),
    (5, torch.randn(8), "biases must be \\[16\\]"),
    (1, torch.randn(2, 4, dtype=F64), "must have input's dtype"),
])
def test_cpp_checks_guard_direct_op_calls(i, t, words):
    with pytest.raises(RuntimeError, match=words):
        torch.ops.fastbig.lstm_cell_step(*_with(i, t))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F32, torch.float16, torch.bfloat16])
def test_cuda_vs_float64(dtype):
    """CUDA: cuBLAS GEMMs + the fused cell kernels, one op; every gradient vs the float64 oracle."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        args = [t.detach().cuda().requires_grad_() if t is not None else None
                for t in _case(33, 70, 53, dtype=dtype)]
        B, H = args[1].shape
        with fastbig.backends.use("cuda"):
            h, c = fastbig.ops.lstm_cell_step(*args)
        a64 = [t.detach().cpu().double().requires_grad_() for t in args]
        h64, c64 = ref_cell(*a64)
        assert_close(h, h64, dtype, name="h")
        assert_close(c, c64, dtype, name="c")
        gh, gc = randn(B, H, dtype=dtype, device="cuda"), randn(B, H, dtype=dtype, device="cuda")
        g = torch.autograd.grad((h, c), args, (gh, gc))
        g64 = torch.autograd.grad((h64, c64), a64, (gh.cpu().double(), gc.cpu().double()))
        for a, b in zip(g, g64):
            assert_close(a, b, dtype)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
