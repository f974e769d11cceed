"""Determinism: under torch.use_deterministic_algorithms(True), two runs of forward and backward
of every op (each backend this machine can run) are bitwise equal, dropout included once the
seed is reset.

Where this holds by design: the Triton attention kernels use no atomics (fastbig/kernels/
attention.py: dK/dV per key block, dQ per query block, each written by one program), so their
backward is bit-for-bit repeatable. The C++ LSTM and BatchNorm paths are checked here on CPU only;
their CUDA kernels (csrc/*/*.cu) are not exercised on this machine (no GPU), and this file has no
GPU cases yet.
"""
import pytest
import torch

import fastbig
from fastbig import backends
from conftest import has_extension


@pytest.fixture(autouse=True)
def deterministic():
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)


def _inputs(shapes, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype=dtype, device=device).requires_grad_()
            for s in shapes]


def _run_twice(fn, shapes, dtype=torch.float32, device="cpu", seed=0, torch_seed=None):
    results = []
    for _ in range(2):
        xs = _inputs(shapes, dtype, device, seed)
        if torch_seed is not None:
            torch.manual_seed(torch_seed)
        out = fn(*xs)
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]
        g = torch.Generator().manual_seed(seed + 1)
        gos = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype).to(o.device) for o in outs]
        grads = torch.autograd.grad([o for o in outs if o.requires_grad],
                                    xs, [go for o, go in zip(outs, gos) if o.requires_grad], allow_unused=True)
        results.append([o.detach() for o in outs] + [gr for gr in grads if gr is not None])
    a, b = results
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"tensor {i} differs between two identical runs " \
                                  f"(max diff {(x.double() - y.double()).abs().max().item():.3e})"


CELL = [(33, 4 * 19), (33, 19)]
LAYER = [(5, 3, 7), (3, 11), (3, 11), (44, 7), (44, 11), (44,), (44,)]
CONV = [(4, 3, 9, 9), (6, 3, 3, 3), (6,), (6,)]
ATT = [(2, 4, 37, 32), (2, 2, 45, 32), (2, 2, 45, 32)]


@has_extension
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_lstm_cell(backend):
    with backends.use(backend):
        _run_twice(fastbig.ops.lstm_cell, CELL)


@has_extension
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("reverse", [False, True])
def test_lstm_layer(backend, reverse):
    with backends.use(backend):
        _run_twice(lambda *a: fastbig.ops.lstm(*a, reverse=reverse), LAYER)


@has_extension
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "none"])
def test_conv_bn_act(backend, act):
    def fn(x, w, bw, bb):
        rm, rv, nbt = torch.zeros(6), torch.ones(6), torch.zeros((), dtype=torch.long)
        return fastbig.ops.conv_bn_act(x, w, None, bw, bb, rm, rv, nbt, padding=1, activation=act)
    with backends.use(backend):
        _run_twice(fn, CONV)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("mode", ["causal", "mask", "dropout"])
def test_attention(backend, mode):
    kw = {"causal": dict(causal=True), "mask": dict(attn_mask=torch.rand(37, 45) > 0.2),
          "dropout": dict(dropout_p=0.3)}[mode]
    with backends.use(backend):
        _run_twice(lambda q, k, v: fastbig.ops.attention(q, k, v, **kw), ATT, torch_seed=123)


@pytest.mark.parametrize("mode", ["causal", "dropout"])
def test_attention_triton(interpret_triton, mode):
    kw = dict(causal=True) if mode == "causal" else dict(dropout_p=0.3)
    # 33 queries x 40 keys: two blocks of 32 each way in the interpreter, so the backward's
    # dK/dV and dQ loops really run over more than one block
    _run_twice(lambda q, k, v: fastbig.ops.attention(q, k, v, **kw),
               [(1, 2, 33, 16), (1, 1, 40, 16), (1, 1, 40, 16)], torch_seed=7)


def test_dropout_differs_between_seeds():
    """The dropout test above is not vacuous: another seed gives another mask."""
    q, k, v = _inputs(ATT, torch.float32, "cpu", 0)
    torch.manual_seed(1)
    a = fastbig.ops.attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(2)
    b = fastbig.ops.attention(q, k, v, dropout_p=0.3)
    assert not torch.equal(a, b)


@has_extension
@pytest.mark.parametrize("name", ["LSTM", "MultiheadAttention", "ConvBnReLU2d"])
def test_modules(name):
    import fuzz as fc
    make_f, _, inputs, kw = fc.module_cases()[name]
    torch.manual_seed(0)
    m = make_f()
    (x, *rest) = inputs()

    def fn(x):
        return m(x, *([x] * len(rest)), **kw)
    _run_twice(fn, [tuple(x.shape)])


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["lstm_cell", "lstm", "conv_bn_act", "attention", "attention_dropout"])
def test_cuda_ops(op):
    """The same two-run check on the GPU kernels (skipped without a GPU)."""
    fns = {
        "lstm_cell": (fastbig.ops.lstm_cell, CELL),
        "lstm": (fastbig.ops.lstm, LAYER),
        "conv_bn_act": (lambda x, w, bw, bb: fastbig.ops.conv_bn_act(x, w, None, bw, bb, padding=1), CONV),
        "attention": (lambda q, k, v: fastbig.ops.attention(q, k, v, causal=True), ATT),
        "attention_dropout": (lambda q, k, v: fastbig.ops.attention(q, k, v, dropout_p=0.3), ATT),
    }
    fn, shapes = fns[op]
    _run_twice(fn, shapes, device="cuda", torch_seed=5)
