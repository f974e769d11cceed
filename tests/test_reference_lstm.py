"""fastbig.reference.lstm is torch.nn.LSTM, in float64: layers, bidirectional, batch_first,
proj_size, biases, unbatched, packed sequences (sorted and unsorted), dropout with masks."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from fastbig.reference import lstm as ref
from conftest import assert_close, randn

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: tiny float64 GEMMs on a loaded 2-core box stall on a descheduled
    second thread (10-100x slower); the math does not depend on it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _weights(m):
    D = 2 if m.bidirectional else 1
    out = []
    for layer in range(m.num_layers):
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            out.append((getattr(m, "weight_ih" + sfx), getattr(m, "weight_hh" + sfx),
                        getattr(m, "bias_ih" + sfx) if m.bias else None,
                        getattr(m, "bias_hh" + sfx) if m.bias else None,
                        getattr(m, "weight_hr" + sfx) if m.proj_size else None))
    return out


def _kw(m):
    return dict(num_layers=m.num_layers, batch_first=m.batch_first, dropout=m.dropout, training=m.training,
                bidirectional=m.bidirectional, proj_size=m.proj_size)


def _grads(outs, m, extra):
    y, (h, c) = outs
    y = y.data if hasattr(y, "batch_sizes") else y
    loss = (y * torch.linspace(-1, 1, y.numel(), dtype=F64).view(y.shape)).sum() + h.square().sum() + c.sum()
    return torch.autograd.grad(loss, list(extra) + list(m.parameters()), retain_graph=True)


CONFIGS = [
    dict(),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=2, proj_size=4, bidirectional=True),
    dict(batch_first=True, bias=False),
    dict(num_layers=3, proj_size=3),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
@pytest.mark.parametrize("with_hx", [False, True])
def test_reference_equals_torch_lstm_float64(cfg, with_hx):
    I, H, T, B = 6, 9, 5, 3
    m = torch.nn.LSTM(I, H, **cfg).double()
    D = 2 if m.bidirectional else 1
    P = m.proj_size or H
    x = randn(B, T, I, dtype=F64, requires_grad=True) if m.batch_first else randn(T, B, I, dtype=F64, requires_grad=True)
    hx = (randn(m.num_layers * D, B, P, dtype=F64, requires_grad=True),
          randn(m.num_layers * D, B, H, dtype=F64, requires_grad=True)) if with_hx else None
    got = ref.lstm(x, hx, _weights(m), **_kw(m))
    want = m(x, hx)
    for a, b, name in ((got[0], want[0], "output"), (got[1][0], want[1][0], "h_n"), (got[1][1], want[1][1], "c_n")):
        assert_close(a, b, F64, name=name)
    extra = [x] + (list(hx) if with_hx else [])
    for i, (a, b) in enumerate(zip(_grads(got, m, extra), _grads(want, m, extra))):
        assert_close(a, b, F64, name=f"grad {i}")


@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("cfg", [dict(), dict(num_layers=2, bidirectional=True, proj_size=4)])
def test_reference_packed_equals_torch(enforce_sorted, cfg):
    I, H, T = 5, 8, 7
    lengths = torch.tensor([7, 5, 5, 2, 1]) if enforce_sorted else torch.tensor([2, 7, 1, 5, 5])
    B = len(lengths)
    m = torch.nn.LSTM(I, H, **cfg).double()
    D = 2 if m.bidirectional else 1
    P = m.proj_size or H
    x = randn(T, B, I, dtype=F64, requires_grad=True)
    h0 = randn(m.num_layers * D, B, P, dtype=F64, requires_grad=True)
    c0 = randn(m.num_layers * D, B, H, dtype=F64, requires_grad=True)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    got = ref.lstm(packed, (h0, c0), _weights(m), **_kw(m))
    want = m(packed, (h0, c0))
    assert torch.equal(got[0].batch_sizes, want[0].batch_sizes)
    if not enforce_sorted:
        assert torch.equal(got[0].unsorted_indices, want[0].unsorted_indices)
    assert_close(got[0].data, want[0].data, F64, name="output")
    assert_close(got[1][0], want[1][0], F64, name="h_n")
    assert_close(got[1][1], want[1][1], F64, name="c_n")
    for i, (a, b) in enumerate(zip(_grads(got, m, [x, h0, c0]), _grads(want, m, [x, h0, c0]))):
        assert_close(a, b, F64, name=f"grad {i}")


def test_reference_unbatched_equals_torch():
    m = torch.nn.LSTM(4, 6, num_layers=2, bidirectional=True).double()
    x = randn(5, 4, dtype=F64)
    hx = (randn(4, 6, dtype=F64), randn(4, 6, dtype=F64))
    got, want = ref.lstm(x, hx, _weights(m), **_kw(m)), m(x, hx)
    assert_close(got[0], want[0], F64)
    assert_close(got[1][0], want[1][0], F64)
    assert_close(got[1][1], want[1][1], F64)


def test_reference_dropout_masks_and_generator():
    m = torch.nn.LSTM(4, 6, num_layers=3, dropout=0.4).double().train()
    x = randn(5, 2, 4, dtype=F64)
    kw = _kw(m)
    eval_out = m.eval()(x)[0]
    ones = [torch.ones(10, 6, dtype=F64) for _ in range(2)]
    # masks of ones scale by 1/(1-p) only: not the eval output; zero masks cut the layers apart
    scaled = ref.lstm(x, None, _weights(m), **kw, dropout_masks=ones)[0]
    assert not torch.allclose(scaled, eval_out)
    kw_eval = dict(kw, training=False)
    assert_close(ref.lstm(x, None, _weights(m), **kw_eval)[0], eval_out, F64)
    zeros = [torch.zeros(10, 6, dtype=F64) for _ in range(2)]
    cut = ref.lstm(x, None, _weights(m), **kw, dropout_masks=zeros)[0]
    cut_other_x = ref.lstm(randn(5, 2, 4, dtype=F64), None, _weights(m), **kw, dropout_masks=zeros)[0]
    assert_close(cut, cut_other_x, F64, name="zero masks: the last layer sees no input")
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = ref.lstm(x, None, _weights(m), **kw, generator=g1)[0]
    b = ref.lstm(x, None, _weights(m), **kw, generator=g2)[0]
    c = ref.lstm(x, None, _weights(m), **kw, generator=g1)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_reference_layer_rows_stop_at_their_length():
    """lstm_layer on packed rows equals running each sequence alone, forward and reverse."""
    I, H = 3, 4
    w_ih, w_hh = randn(4 * H, I, dtype=F64), randn(4 * H, H, dtype=F64)
    b_ih, b_hh = randn(4 * H, dtype=F64), randn(4 * H, dtype=F64)
    lengths = [4, 2, 1]
    seqs = [randn(n, I, dtype=F64) for n in lengths]
    h0, c0 = randn(3, H, dtype=F64), randn(3, H, dtype=F64)
    padded = torch.nn.utils.rnn.pad_sequence(seqs)
    packed = pack_padded_sequence(padded, torch.tensor(lengths))
    for reverse in (False, True):
        y, h_n, c_n = ref.lstm_layer(packed.data, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                     batch_sizes=packed.batch_sizes, reverse=reverse)
        for b, s in enumerate(seqs):
            y1, h1, c1 = ref.lstm_layer(s, h0[b:b + 1], c0[b:b + 1], w_ih, w_hh, b_ih, b_hh, reverse=reverse)
            rows = [sum(packed.batch_sizes[:t].tolist()) + b for t in range(lengths[b])]
            assert_close(y[rows], y1, F64)
            assert_close(h_n[b:b + 1], h1, F64)
            assert_close(c_n[b:b + 1], c1, F64)
