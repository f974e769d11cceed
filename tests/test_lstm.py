"""fastbig's fused LSTM: the layer op (fastbig::lstm_layer) and the drop-in fastbig.nn.LSTM /
LSTMCell, against the float64 oracle (fastbig.reference.lstm) and against torch.nn itself."""
import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastbig
from fastbig.reference import lstm as ref
from conftest import DEVICES, HAS_CUDA, assert_close, has_extension, randn, rel_err

pytestmark = has_extension
F32, F64 = torch.float32, torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on the shared 2-core CI box a 2-thread GEMM that waits on a
    descheduled worker costs 10-100x. The results do not depend on it;
    test_parallel_rows_match_serial runs the threaded path on purpose."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _fast(device):
    return fastbig.backends.use("cpu" if str(device).startswith("cpu") else "cuda")


def _weights(m):
    D = 2 if m.bidirectional else 1
    out = []
    for layer in range(m.num_layers):
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            out.append(tuple(getattr(m, p + sfx) if (p[0] == "w" or m.bias) and (p != "weight_hr" or m.proj_size)
                             else None for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")))
    return out


def _pair(I, H, dtype=F32, device="cpu", **cfg):
    """A torch.nn.LSTM (float64, the oracle's weights) and a fastbig.nn.LSTM loaded from it."""
    tm = torch.nn.LSTM(I, H, **cfg).double()
    for p in tm.parameters():  # fresh normal weights, std 1/sqrt(H): a well-conditioned recurrence
        with torch.no_grad():  # (std 0.3 at H=256 is chaotic: torch's own fp32 LSTM is off by 4e-4 there)
            p.copy_(randn(*p.shape, dtype=F64, scale=H ** -0.5))
    fm = fastbig.nn.LSTM(I, H, **cfg)
    fm.load_state_dict(tm.state_dict(), strict=True)
    return tm, fm.to(device=device, dtype=dtype)


def _loss(y, h, c):
    y = y.data if isinstance(y, PackedSequence) else y
    w = torch.linspace(-1, 1, y.numel(), dtype=F64, device=y.device).view(y.shape).to(y.dtype)
    return (y * w).sum() + (h * h).sum() + c.sum()


def _compare(fm, tm, x, hx, dtype, device, tag="", factor=1.0, oracle="reference"):
    """fastbig (dtype, device) vs the float64 oracle: outputs, h_n, c_n and every gradient.

    oracle "reference": fastbig.reference.lstm in float64; "torch": torch.nn.LSTM in float64
    (the same function, test_reference_lstm.py proves; faster for the long sequences)."""
    packed = isinstance(x, PackedSequence)
    x64 = x.data.double() if packed else x.double()
    x64 = x64.detach().requires_grad_()
    xd = x64.detach().to(device=device, dtype=dtype).requires_grad_()
    hx64 = tuple(t.detach().double().requires_grad_() for t in hx) if hx else None
    hxd = tuple(t.detach().to(device=device, dtype=dtype).requires_grad_() for t in hx) if hx else None
    inp64 = PackedSequence(x64, x.batch_sizes, x.sorted_indices, x.unsorted_indices) if packed else x64
    inpd = PackedSequence(xd, x.batch_sizes, *(None if t is None else t.to(device) for t in
                                                (x.sorted_indices, x.unsorted_indices))) if packed else xd
    if oracle == "torch":
        y64, (h64, c64) = tm(inp64, hx64)
    else:
        y64, (h64, c64) = ref.lstm(inp64, hx64, _weights(tm), num_layers=tm.num_layers,
                                   batch_first=tm.batch_first, bidirectional=tm.bidirectional,
                                   proj_size=tm.proj_size)
    if hxd is not None:  # poison-free: the op must not write into the caller's tensors
        keep = [t.detach().clone() for t in (xd,) + hxd]
    with _fast(device):
        y, (h, c) = fm(inpd, hxd)
    yd, y64d = (y.data, y64.data) if packed else (y, y64)
    assert yd.dtype == dtype and h.dtype == dtype
    assert_close(yd, y64d, dtype, name=f"{tag} output", factor=factor)
    assert_close(h, h64, dtype, name=f"{tag} h_n", factor=factor)
    assert_close(c, c64, dtype, name=f"{tag} c_n", factor=factor)
    ins64 = [x64] + (list(hx64) if hx64 else []) + list(_flat(tm))
    insd = [xd] + (list(hxd) if hxd else []) + list(_flat(fm))
    g64 = torch.autograd.grad(_loss(y64, h64, c64), ins64)
    gd = torch.autograd.grad(_loss(y, h, c), insd)
    names = ["x"] + (["h0", "c0"] if hx else []) + [n for n, _ in fm.named_parameters()]
    for a, b, n in zip(gd, g64, names):
        assert_close(a, b, dtype, name=f"{tag} grad {n}", factor=factor)
    if hxd is not None:
        for a, b in zip(keep, (xd,) + hxd):
            assert torch.equal(a, b.detach()), "an input was written to"
    return y, h, c


def _flat(m):
    return [p for _, p in m.named_parameters()]


# ---- the layer module against the float64 oracle, CPU ---------------------------------------
SHAPES = [  # T, B, I, H
    (1, 1, 7, 53),
    (7, 64, 33, 53),
    (100, 1, 16, 256),
    (100, 64, 256, 256),
]


@pytest.mark.parametrize("T,B,I,H", SHAPES, ids=lambda v: str(v))
def test_lstm_shapes_vs_float64(T, B, I, H):
    tm, fm = _pair(I, H)
    x = randn(T, B, I)
    hx = (randn(1, B, H), randn(1, B, H))
    _compare(fm, tm, x, hx, F32, "cpu", tag=f"T{T} B{B} H{H}", oracle="torch" if T * B > 64 else "reference")


CONFIGS = [
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=2, proj_size=17, bidirectional=True),
    dict(proj_size=5),
    dict(batch_first=True, bias=False, num_layers=2),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("with_hx", [True, False])
def test_lstm_configs_vs_float64(cfg, with_hx):
    I, H, T, B = 19, 53, 9, 6
    tm, fm = _pair(I, H, **cfg)
    D = 2 if tm.bidirectional else 1
    P = tm.proj_size or H
    x = randn(B, T, I) if tm.batch_first else randn(T, B, I)
    hx = (randn(tm.num_layers * D, B, P), randn(tm.num_layers * D, B, H)) if with_hx else None
    _compare(fm, tm, x, hx, F32, "cpu")


@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("cfg", [dict(), dict(num_layers=2, bidirectional=True, proj_size=11)],
                         ids=["plain", "bi-proj"])
def test_lstm_packed_mixed_lengths_vs_float64(enforce_sorted, cfg):
    I, H, T = 13, 53, 17
    lengths = [17, 12, 12, 5, 1, 1] if enforce_sorted else [5, 17, 1, 12, 1, 12]
    B = len(lengths)
    tm, fm = _pair(I, H, **cfg)
    D = 2 if tm.bidirectional else 1
    P = tm.proj_size or H
    packed = pack_padded_sequence(randn(T, B, I), torch.tensor(lengths), enforce_sorted=enforce_sorted)
    hx = (randn(tm.num_layers * D, B, P), randn(tm.num_layers * D, B, H))
    y, h, c = _compare(fm, tm, packed, hx, F32, "cpu")
    assert isinstance(y, PackedSequence)
    assert torch.equal(y.batch_sizes, packed.batch_sizes)
    if not enforce_sorted:
        assert torch.equal(y.sorted_indices, packed.sorted_indices)
        assert torch.equal(y.unsorted_indices, packed.unsorted_indices)


def test_lstm_unbatched_vs_float64_and_torch():
    tm, fm = _pair(8, 53, num_layers=2, bidirectional=True)
    x = randn(11, 8)
    hx = (randn(4, 53), randn(4, 53))
    _compare(fm, tm, x, hx, F32, "cpu")
    fm = fm.double()
    fm.load_state_dict(tm.state_dict(), strict=True)
    with _fast("cpu"):
        y, (h, c) = fm(x.double(), tuple(t.double() for t in hx))
    yt, (ht, ct) = tm(x.double(), tuple(t.double() for t in hx))
    assert y.shape == yt.shape == (11, 106) and h.shape == ht.shape == (4, 53)
    assert_close(y, yt, F64)
    assert_close(c, ct, F64)


@pytest.mark.parametrize("limit", ["0", ""], ids=["generic-loop", "fused-loop"])
def test_parallel_rows_match_serial(limit, monkeypatch):
    """The generic loop's pointwise kernels split rows over threads (B=64, H=256: 4 chunks);
    the fused loop splits the 32 unit tiles between threads: same answer as one thread."""
    monkeypatch.setenv("FASTBIG_LSTM_SMALL_BATCH", limit)
    tm, fm = _pair(32, 256)
    x = randn(3, 64, 32)
    torch.set_num_threads(2)
    _compare(fm, tm, x, (randn(1, 64, 256), randn(1, 64, 256)), F32, "cpu", oracle="torch")
    with _fast("cpu"):
        y2 = fm(x)[0]
        torch.set_num_threads(1)
        y1 = fm(x)[0]
    assert torch.equal(y1, y2)


# ---- the CPU's fused time loop (csrc/lstm/lstm_layer_cpu.cpp, batch <= 64, float32, no
# proj_size) against the generic loop (per-step GEMM + pointwise) and the float64 oracle ---------
def _op_case(T, B, I, H, packed, reverse, bias):
    if packed:
        lengths = sorted(torch.randint(1, T + 1, (B,)).tolist(), reverse=True)
        lengths[0] = T
        bs = torch.tensor([sum(n > t for n in lengths) for t in range(T)], dtype=torch.int64)
        x = randn(int(bs.sum()), I, dtype=F64)
    else:
        bs, x = None, randn(T, B, I, dtype=F64)
    w = [randn(4 * H, I, dtype=F64, scale=I ** -0.5), randn(4 * H, H, dtype=F64, scale=H ** -0.5)]
    b = [randn(4 * H, dtype=F64, scale=0.3), randn(4 * H, dtype=F64, scale=0.3)] if bias else [None, None]
    args64 = [x, randn(B, H, dtype=F64, scale=0.5), randn(B, H, dtype=F64, scale=0.5)] + w + b
    return args64, bs


@pytest.mark.parametrize("T,B,I,H,packed,reverse,bias", [
    (9, 1, 7, 53, False, False, True),     # batch-1 latency path, odd H: a partial unit tile
    (9, 3, 16, 53, False, True, True),     # reverse
    (13, 8, 16, 40, True, False, True),    # packed sequences: rows leave, h_n/c_n of each
    (6, 13, 9, 53, False, False, True),    # 13 rows: the 6-row kernel twice, then one row
    (13, 5, 16, 40, True, True, False),    # packed + reverse: rows join from h0/c0; no bias
    (5, 2, 8, 64, False, False, True),     # 8 tiles: two threads, a barrier per step
    (5, 7, 8, 100, True, True, True),      # backward: 4 column tiles (2 threads), the last partial
])
@pytest.mark.parametrize("threads", [1, 2])
def test_small_batch_fused_loop_vs_generic_and_float64(T, B, I, H, packed, reverse, bias, threads, monkeypatch):
    args64, bs = _op_case(T, B, I, H, packed, reverse, bias)
    torch.set_num_threads(threads)
    want = ref.lstm_layer(args64[0].reshape(-1, I), *args64[1:], batch_sizes=bs, reverse=reverse)
    outs = {}
    for limit in ("64", "0"):  # 64: the fused loop (the default); 0: the generic loop
        monkeypatch.setenv("FASTBIG_LSTM_SMALL_BATCH", limit)
        args = [a.float().requires_grad_() if a is not None else None for a in args64]
        with fastbig.backends.use("cpu"):
            y, h_n, c_n = fastbig.ops.lstm_layer(*args, batch_sizes=bs, reverse=reverse)
        for o, r, n in zip((y.reshape(-1, H), h_n, c_n), want, ("y", "h_n", "c_n")):
            assert_close(o, r, F32, name=f"limit={limit} {n}")
        # the backward consumes the forward's saved gates and cells: gradients check them too
        loss = (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum() + (h_n * c_n).sum()
        grads = torch.autograd.grad(loss, [a for a in args if a is not None])
        outs[limit] = (y.detach(), h_n.detach(), c_n.detach()) + grads
    args64 = [a.requires_grad_() if a is not None else None for a in args64]
    y64, h64, c64 = ref.lstm_layer(args64[0].reshape(-1, I), *args64[1:], batch_sizes=bs, reverse=reverse)
    y64 = y64.view(outs["64"][0].shape)
    loss64 = (y64 * torch.linspace(-1, 1, y64.numel(), dtype=F64).view(y64.shape)).sum() + (h64 * c64).sum()
    g64 = torch.autograd.grad(loss64, [a for a in args64 if a is not None])
    for limit, got in outs.items():
        for k, (a, b) in enumerate(zip(got[3:], g64)):
            assert_close(a, b, F32, name=f"limit={limit} grad {k}")
    for a, b in zip(outs["64"], outs["0"]):  # the two loops: one function, to float32 rounding
        assert_close(a, b.double(), F32, name="fused vs generic")


@pytest.mark.parametrize("B", [1, 64, 65], ids=["fused-B1", "fused-B64", "generic-B65"])
def test_nan_input_propagates_not_clamped(B):
    """A NaN in x reaches exactly the outputs that depend on it (as in torch.nn.LSTM): the
    SIMD exp clamped NaN to a bound once, turning it into a finite, wrong value."""
    x = randn(3, B, 8)
    x[1, 0, 2] = float("nan")
    m = fastbig.nn.LSTM(8, 16)
    with torch.no_grad(), fastbig.backends.use("cpu"):
        y, (h, c) = m(x)
    assert y[1:, 0].isnan().all() and h[0, 0].isnan().all() and c[0, 0].isnan().all()
    assert not y[0].isnan().any() and not y[:, 1:].isnan().any()
    g = randn(2, 64)
    g[0, 3] = float("nan")
    with fastbig.backends.use("cpu"):
        h1, c1 = fastbig.ops.lstm_cell_pointwise(g, randn(2, 16))
    assert h1[0, 3].isnan() and c1[0, 3].isnan() and not h1[1].isnan().any()


def test_small_batch_fused_loop_long_sequence_vs_float64():
    """Batch 1, T=100, H=256 (the latency case, 32 tiles): no drift over a long recurrence."""
    args64, _ = _op_case(100, 1, 16, 256, False, False, True)
    want = ref.lstm_layer(args64[0].reshape(-1, 16), *args64[1:])
    with fastbig.backends.use("cpu"):
        got = fastbig.ops.lstm_layer(*[a.float() for a in args64])
    for o, r, n in zip((got[0].reshape(-1, 256),) + tuple(got[1:]), want, ("y", "h_n", "c_n")):
        assert_close(o, r, F32, name=n)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lstm_half_precision_cpu_vs_float64(dtype):
    tm, fm = _pair(16, 53, dtype=dtype, num_layers=2, bidirectional=True, proj_size=7)
    _compare(fm, tm, randn(9, 4, 16), (randn(4, 4, 7), randn(4, 4, 53)), dtype, "cpu")


def test_lstm_float32_equals_torch_nn_lstm_within_tolerance():
    """The drop-in claim as a user sees it: both float32, both near the float64 oracle."""
    torch_m = torch.nn.LSTM(32, 53, num_layers=2, bidirectional=True, proj_size=20)
    fast_m = fastbig.nn.LSTM(32, 53, num_layers=2, bidirectional=True, proj_size=20)
    fast_m.load_state_dict(torch_m.state_dict(), strict=True)
    x = randn(9, 4, 32)
    with _fast("cpu"):
        y, (h, c) = fast_m(x)
    yt, (ht, ct) = torch_m(x)
    y64, (h64, c64) = torch_m.double()(x.double())
    for a, b, r in ((y, yt, y64), (h, ht, h64), (c, ct, c64)):
        assert_close(a, r, F32)
        assert_close(b, r, F32)
        assert rel_err(a, b) < 2e-5


def test_lstm_float64_gradcheck_layer_op():
    """gradcheck of fastbig::lstm_layer (CPU, float64): projections, packed rows, both directions."""
    I, H, P = 3, 5, 2
    bs = torch.tensor([3, 3, 2, 1])
    N, B = int(bs.sum()), 3
    args = [randn(N, I, dtype=F64, requires_grad=True), randn(B, P, dtype=F64, requires_grad=True),
            randn(B, H, dtype=F64, requires_grad=True), randn(4 * H, I, dtype=F64, requires_grad=True),
            randn(4 * H, P, dtype=F64, requires_grad=True), randn(4 * H, dtype=F64, requires_grad=True),
            randn(4 * H, dtype=F64, requires_grad=True), randn(P, H, dtype=F64, requires_grad=True)]
    for reverse in (False, True):
        with fastbig.backends.use("cpu"):
            assert torch.autograd.gradcheck(
                lambda *a: fastbig.ops.lstm_layer(*a, batch_sizes=bs, reverse=reverse), args, eps=1e-6, atol=1e-7,
                fast_mode=True)
    x3 = randn(4, 2, I, dtype=F64, requires_grad=True)
    no_proj = [x3, randn(2, H, dtype=F64, requires_grad=True), randn(2, H, dtype=F64, requires_grad=True),
               randn(4 * H, I, dtype=F64, requires_grad=True), randn(4 * H, H, dtype=F64, requires_grad=True)]
    with fastbig.backends.use("cpu"):
        assert torch.autograd.gradcheck(lambda *a: fastbig.ops.lstm_layer(*a, reverse=True), no_proj, eps=1e-6,
                                        atol=1e-7, fast_mode=True)


def _layer_args(dtype=F64, device="cpu", proj=True, packed=True, grad=True):
    I, H, P, B = 6, 7, 3, 4
    bs = torch.tensor([4, 3, 3, 1]) if packed else None
    N = int(bs.sum()) if packed else 3 * B
    Pp = P if proj else H
    mk = lambda *s: randn(*s, dtype=dtype, device=device, requires_grad=grad)  # noqa: E731
    return (mk(N, I), mk(B, Pp), mk(B, H), mk(4 * H, I), mk(4 * H, Pp), mk(4 * H), mk(4 * H),
            mk(P, H) if proj else None, bs, False)


@pytest.mark.parametrize("proj,packed", [(True, True), (False, False)])
def test_opcheck_layer_ops(proj, packed):
    args = _layer_args(proj=proj, packed=packed)
    rev = args[:-1] + (True,)
    if proj:  # every opcheck test on the richest case, the quick ones elsewhere (time budget)
        torch.library.opcheck(torch.ops.fastbig.lstm_layer.default, args)
    else:
        torch.library.opcheck(torch.ops.fastbig.lstm_layer.default, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.fastbig.lstm_layer.default, rev, test_utils=("test_faketensor",))
    nograd = tuple(a.detach() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    y, h_n, c_n, act, c_all, hraw = torch.ops.fastbig.lstm_layer(*nograd)
    x, h0, c0, w_ih, w_hh, _, _, w_hr, bs, reverse = nograd
    bw = (torch.randn_like(y), torch.randn_like(h_n), None, x, h0, c0, w_ih, w_hh, w_hr, bs, reverse, y, act, c_all,
          hraw)
    torch.library.opcheck(torch.ops.fastbig.lstm_layer_backward.default, bw)


def test_opcheck_lstm_cell():
    g = randn(5, 4 * 9, requires_grad=True)
    c = randn(5, 9, requires_grad=True)
    torch.library.opcheck(torch.ops.fastbig.lstm_cell.default, (g, c))


def test_no_uninitialized_memory_reaches_outputs():
    """Every empty() the op makes is NaN-filled here; outputs and grads must still be exact."""
    tm, fm = _pair(10, 53, num_layers=2, bidirectional=True, proj_size=7)
    lengths = torch.tensor([6, 2, 4])
    packed = pack_padded_sequence(randn(6, 3, 10), lengths, enforce_sorted=False)
    old = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.empty(4).isnan().all()  # the poisoning is active
        _compare(fm, tm, packed, None, F32, "cpu")
        _compare(fm, tm, randn(5, 3, 10), None, F32, "cpu")
    finally:
        torch.use_deterministic_algorithms(old[0])
        torch.utils.deterministic.fill_uninitialized_memory = old[1]


def test_dropout_eval_equals_torch_train_is_random_and_sane():
    torch_m = torch.nn.LSTM(12, 53, num_layers=3, dropout=0.3)
    fm = fastbig.nn.LSTM(12, 53, num_layers=3, dropout=0.3)
    fm.load_state_dict(torch_m.state_dict(), strict=True)
    x = randn(8, 5, 12)
    fm.eval()
    torch_m.eval()
    with _fast("cpu"):
        ye = fm(x)[0]
        assert torch.equal(ye, fm(x)[0])  # eval is deterministic
    assert rel_err(ye, torch_m(x)[0]) < 2e-5
    fm.train()
    with _fast("cpu"):
        torch.manual_seed(1)
        y1 = fm(x)[0]
        torch.manual_seed(1)
        y1b = fm(x)[0]
        y2 = fm(x)[0]
    assert torch.isfinite(y1).all()
    assert torch.equal(y1, y1b) and not torch.equal(y1, y2) and not torch.allclose(y1, ye)
    # more dropout moves the train output further from eval, on average over draws
    gaps = {}
    for p in (0.05, 0.7):
        fm.dropout = p
        with _fast("cpu"):
            gaps[p] = sum((fm(x)[0] - ye).abs().mean().item() for _ in range(4))
    assert gaps[0.05] < gaps[0.7]
    fm.dropout = 0.3
    with _fast("cpu"):
        g = torch.autograd.grad(fm(x)[0].sum(), list(fm.parameters()))
    assert all(torch.isfinite(t).all() for t in g)


def test_state_dict_round_trip_both_ways():
    for cfg in (dict(num_layers=2, bidirectional=True, proj_size=4), dict(bias=False)):
        tm = torch.nn.LSTM(6, 9, **cfg)
        fm = fastbig.nn.LSTM(6, 9, **cfg)
        assert list(fm.state_dict().keys()) == list(tm.state_dict().keys())
        fm.load_state_dict(tm.state_dict(), strict=True)
        tm2 = torch.nn.LSTM(6, 9, **cfg)
        tm2.load_state_dict(fm.state_dict(), strict=True)
        for (k, a), (_, b) in zip(tm.state_dict().items(), tm2.state_dict().items()):
            assert torch.equal(a, b), k
    tc = torch.nn.LSTMCell(5, 7)
    fc = fastbig.nn.LSTMCell(5, 7)
    fc.load_state_dict(tc.state_dict(), strict=True)
    tc2 = torch.nn.LSTMCell(5, 7)
    tc2.load_state_dict(fc.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(tc.state_dict().values(), tc2.state_dict().values()))


def test_torch_compile_fullgraph_model():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = fastbig.nn.LSTM(8, 16, num_layers=2, batch_first=True, bidirectional=True)
            self.head = torch.nn.Linear(32, 3)

        def forward(self, x):
            y, (h, c) = self.lstm(x)
            return self.head(y[:, -1]) + h.sum(0).mean()

    torch._dynamo.reset()
    m = Model()
    x = randn(3, 5, 8)
    with _fast("cpu"):
        eager = m(x)
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        out = compiled(x)
        assert_close(out, eager.detach(), F32)
        g = torch.autograd.grad(out.sum(), list(m.parameters()))
        ge = torch.autograd.grad(m(x).sum(), list(m.parameters()))
    for a, b in zip(g, ge):
        assert_close(a, b, F32)


def test_noncontiguous_weights_work():
    tm, fm = _pair(10, 53)
    with torch.no_grad():  # same values, transposed storage
        for name in ("weight_ih_l0", "weight_hh_l0"):
            p = getattr(fm, name)
            p.set_(p.detach().t().contiguous().t())
    assert not fm.weight_ih_l0.is_contiguous()
    _compare(fm, tm, randn(5, 3, 10), None, F32, "cpu")


def test_backends_reference_and_auto():
    tm, fm = _pair(10, 53, num_layers=2)
    x = randn(5, 3, 10)
    with fastbig.backends.use("reference"):
        yr = fm(x)[0]
    with fastbig.backends.use("auto"):
        ya = fm(x)[0]
    y64 = tm(x.double())[0]
    assert_close(yr, y64, F32)
    assert_close(ya, y64, F32)
    with fastbig.backends.use("triton"), pytest.raises(RuntimeError, match="triton"):
        fm(x)


# ---- bad input: clear errors naming the argument, never a crash -----------------------------
def test_bad_inputs_raise_clear_errors():
    fm = fastbig.nn.LSTM(10, 20, num_layers=2)
    with _fast("cpu"):
        with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size. Expected 10, got 7"):
            fm(randn(5, 3, 7))
        with pytest.raises(RuntimeError, match="Expected hidden\\[0\\] size \\(2, 3, 20\\), got \\[2, 4, 20\\]"):
            fm(randn(5, 3, 10), (randn(2, 4, 20), randn(2, 3, 20)))
        with pytest.raises(RuntimeError, match="Expected hidden\\[1\\] size \\(2, 3, 20\\), got \\[1, 3, 20\\]"):
            fm(randn(5, 3, 10), (randn(2, 3, 20), randn(1, 3, 20)))
        with pytest.raises(ValueError, match="torch.float64"):
            fm(randn(5, 3, 10, dtype=F64))
        with pytest.raises(TypeError, match="h_0 has dtype torch.float64"):
            fm(randn(5, 3, 10), (randn(2, 3, 20, dtype=F64), randn(2, 3, 20)))
        with pytest.raises(ValueError, match="Expected input to be 2D or 3D, got 4D"):
            fm(randn(5, 3, 10, 1))
        with pytest.raises(RuntimeError, match="hx and cx should also be 2-D"):
            fm(randn(5, 10), (randn(2, 3, 20), randn(2, 3, 20)))
        # device mismatch, checked before any kernel runs
        with pytest.raises(RuntimeError, match="h0 is on meta but x is on cpu"):
            fastbig.ops.lstm_layer(randn(5, 3, 10), torch.empty(3, 20, device="meta"), randn(3, 20),
                                   randn(80, 10), randn(80, 20))
        # a PackedSequence whose batch_sizes do not fit its data / its order
        data = randn(9, 10)
        for bad in ([3, 3, 2], [2, 3, 3, 1], [3, 3, 3, 0]):
            with pytest.raises((ValueError, RuntimeError), match="batch_sizes"):
                fm(PackedSequence(data, torch.tensor(bad)))
        with pytest.raises(TypeError, match="batch_sizes must be an int64 CPU tensor"):
            fastbig.ops.lstm_layer(data, randn(3, 20), randn(3, 20), randn(80, 10), randn(80, 20),
                                   batch_sizes=torch.tensor([3, 3, 3], dtype=torch.int32))
        with pytest.raises(ValueError, match="w_hh must have shape \\(80, 20\\), got \\(80, 21\\)"):
            fastbig.ops.lstm_layer(randn(5, 3, 10), randn(3, 20), randn(3, 20), randn(80, 10), randn(80, 21))
        # the C++ op itself (called directly) refuses too, with a message
        with pytest.raises(RuntimeError, match="batch_sizes must be positive, non-increasing"):
            torch.ops.fastbig.lstm_layer(data, randn(3, 20), randn(3, 20), randn(80, 10), randn(80, 20),
                                         None, None, None, torch.tensor([3, 4, 2]), False)
        with pytest.raises(RuntimeError, match="c0 must be"):
            torch.ops.fastbig.lstm_layer(data, randn(3, 20), randn(2, 20), randn(80, 10), randn(80, 20),
                                         None, None, None, None, False)


# ---- LSTMCell ----------------------------------------------------------------------------
@pytest.mark.parametrize("B,I,H,bias", [(1, 7, 53, True), (64, 256, 256, True), (5, 3, 53, False)])
def test_lstm_cell_module_vs_float64(B, I, H, bias):
    tc = torch.nn.LSTMCell(I, H, bias=bias).double()
    fc = fastbig.nn.LSTMCell(I, H, bias=bias)
    fc.load_state_dict(tc.state_dict(), strict=True)
    x, h0, c0 = randn(B, I, requires_grad=True), randn(B, H, requires_grad=True), randn(B, H, requires_grad=True)
    with _fast("cpu"):
        h, c = fc(x, (h0, c0))
    x64, h064, c064 = (t.detach().double().requires_grad_() for t in (x, h0, c0))
    h64, c64 = tc(x64, (h064, c064))
    assert_close(h, h64, F32, name="h")
    assert_close(c, c64, F32, name="c")
    dh, dc = randn(B, H), randn(B, H)
    g = torch.autograd.grad((h, c), [x, h0, c0] + list(fc.parameters()), (dh, dc))
    g64 = torch.autograd.grad((h64, c64), [x64, h064, c064] + list(tc.parameters()), (dh.double(), dc.double()))
    for a, b in zip(g, g64):
        assert_close(a, b, F32)


def test_lstm_cell_unbatched_no_hx_and_errors():
    tc = torch.nn.LSTMCell(4, 6).double()
    fc = fastbig.nn.LSTMCell(4, 6).double()
    fc.load_state_dict(tc.state_dict())
    x = randn(4, dtype=F64)
    with _fast("cpu"):
        h, c = fc(x)
        assert h.shape == (6,)
        assert_close(h, tc(x)[0], F64)
        assert_close(c, tc(x)[1], F64)
        with pytest.raises(RuntimeError, match="input has inconsistent input_size: got 5 expected 4"):
            fc(randn(2, 5, dtype=F64))
        with pytest.raises(RuntimeError, match="Input batch size 2 doesn't match hidden0 batch size 3"):
            fc(randn(2, 4, dtype=F64), (randn(3, 6, dtype=F64), randn(2, 6, dtype=F64)))
        with pytest.raises(RuntimeError, match="hidden1 has inconsistent hidden_size: got 5, expected 6"):
            fc(randn(2, 4, dtype=F64), (randn(2, 6, dtype=F64), randn(2, 5, dtype=F64)))
        with pytest.raises(RuntimeError):  # torch.nn.LSTMCell's type for this one (its cell raises)
            tc(x, (randn(1, 6, dtype=F64), randn(1, 6, dtype=F64)))
        with pytest.raises(RuntimeError, match="Expected hx\\[0\\] to be 1D \\(as the input\\), got 2D"):
            fc(x, (randn(1, 6, dtype=F64), randn(1, 6, dtype=F64)))
        with pytest.raises(ValueError, match="Expected hx\\[0\\] to be 1D or 2D, got 3D"):  # torch's own check
            fc(x, (randn(1, 1, 6, dtype=F64), randn(1, 1, 6, dtype=F64)))
        with pytest.raises(TypeError, match="input has dtype torch.float32"):
            fc(randn(2, 4))


# ---- CUDA (skips here; runs on the GPU machine) ------------------------------------------
@pytest.fixture
def no_tf32():
    """float32 GEMMs in full fp32 (the float32 tolerance is 1e-5), restored afterwards."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


CUDA_TOL_FACTOR = {torch.float32: 1.0, torch.float16: 1.0, torch.bfloat16: 1.0}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", [dict(), dict(num_layers=2, bidirectional=True, proj_size=17)], ids=["plain", "bi-proj"])
def test_cuda_lstm_vs_float64(dtype, cfg, no_tf32):
    tm, fm = _pair(33, 53, dtype=dtype, device="cuda", **cfg)
    D = 2 if tm.bidirectional else 1
    P = tm.proj_size or 53
    hx = (randn(tm.num_layers * D, 6, P), randn(tm.num_layers * D, 6, 53))
    _compare(fm, tm, randn(13, 6, 33), hx, dtype, "cuda", factor=CUDA_TOL_FACTOR[dtype])
    packed = pack_padded_sequence(randn(13, 6, 33), torch.tensor([5, 13, 1, 12, 1, 12]), enforce_sorted=False)
    _compare(fm, tm, packed, hx, dtype, "cuda", factor=CUDA_TOL_FACTOR[dtype])


@pytest.mark.cuda
def test_cuda_big_shape_and_opcheck(no_tf32):
    tm, fm = _pair(256, 256, device="cuda", num_layers=2)
    _compare(fm, tm, randn(100, 64, 256), None, F32, "cuda", oracle="torch")
    args = _layer_args(device="cuda")
    torch.library.opcheck(torch.ops.fastbig.lstm_layer.default, args)


@pytest.mark.cuda
def test_cuda_lstm_cell_module():
    tc = torch.nn.LSTMCell(33, 53).double()
    fc = fastbig.nn.LSTMCell(33, 53).cuda()
    fc.load_state_dict(tc.state_dict())
    x, hx = randn(7, 33), (randn(7, 53), randn(7, 53))
    with _fast("cuda"):
        h, c = fc(x.cuda(), tuple(t.cuda() for t in hx))
    h64, c64 = tc(x.double(), tuple(t.double() for t in hx))
    assert_close(h, h64, F32)
    assert_close(c, c64, F32)


def test_devices_list_is_honest():
    assert ("cuda" in DEVICES) == HAS_CUDA


def test_double_backward_is_a_clear_error():
    x, h0, c0 = randn(3, 2, 4, dtype=F64, requires_grad=True), randn(2, 5, dtype=F64), randn(2, 5, dtype=F64)
    w_ih, w_hh = randn(20, 4, dtype=F64, requires_grad=True), randn(20, 5, dtype=F64, requires_grad=True)
    with _fast("cpu"):
        y, h, c = fastbig.ops.lstm_layer(x, h0, c0, w_ih, w_hh)
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(y.square().sum(), (x, w_ih), create_graph=True)
        y, h, c = fastbig.ops.lstm_layer(x, h0, c0, w_ih, w_hh)
        g = torch.autograd.grad(y.square().sum(), (x, w_ih))  # plain backward is unaffected
    assert all(torch.isfinite(t).all() for t in g)


def test_empty_batch_and_empty_sequence_as_torch():
    """B=0: empty outputs, and each weight gets a zero gradient as torch.nn.LSTM gives (not None:
    an optimizer treats the two differently). T=0: torch's RuntimeError."""
    kw = dict(num_layers=2, bidirectional=True, proj_size=3, batch_first=True)
    torch.manual_seed(0)
    t = torch.nn.LSTM(4, 5, **kw)
    f = fastbig.nn.LSTM(4, 5, **kw)
    f.load_state_dict(t.state_dict())
    x = randn(0, 3, 4, requires_grad=True)
    for m in (t, f):
        y, (h, c) = m(x)
        assert y.shape == (0, 3, 6) and h.shape == (4, 0, 3) and c.shape == (4, 0, 5)
        (y.sum() + h.sum() + c.sum()).backward()
    for (name, pt), pf in zip(t.named_parameters(), f.parameters()):
        assert pf.grad is not None, f"{name}: no gradient (torch gives zeros)"
        assert torch.equal(pf.grad, pt.grad) and not pf.grad.any(), name
    for m in (t, f):
        with pytest.raises(RuntimeError, match="Expected sequence length to be larger than 0"):
            m(randn(2, 0, 4))
