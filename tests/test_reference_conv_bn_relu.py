"""The conv-bn-relu oracle equals torch.nn's Sequential(conv, BatchNorm2d, act) in float64."""
import copy

import pytest
import torch
from torch import nn

from fastbig.reference import conv_bn_relu as ref
from conftest import assert_close, randn

F64 = torch.float64


def _act_module(act, slope):
    return {"relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(slope), "none": nn.Identity()}[act]


def _seq(transposed, cin, cout, k, stride, padding, groups, bias, momentum, act, slope, track=True):
    if transposed:
        conv = nn.ConvTranspose2d(cin, cout, k, stride, padding, output_padding=stride - 1 if stride > 1 else 0,
                                  groups=groups, bias=bias, dtype=F64)
    else:
        conv = nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=bias, dtype=F64)
    bn = nn.BatchNorm2d(cout, momentum=momentum, track_running_stats=track, dtype=F64)
    with torch.no_grad():
        bn.weight.copy_(randn(cout, dtype=F64) * 0.5 + 1)
        bn.bias.copy_(randn(cout, dtype=F64))
        if track:
            bn.running_mean.copy_(randn(cout, dtype=F64))
            bn.running_var.copy_(torch.rand(cout, dtype=F64) + 0.5)
    return nn.Sequential(conv, bn, _act_module(act, slope))


def _ref_call(seq, x, training, momentum, act, slope, transposed, buffers=None, update_in_place=False):
    conv, bn = seq[0], seq[1]
    rm, rv, nbt = buffers if buffers is not None else (bn.running_mean, bn.running_var, bn.num_batches_tracked)
    return ref.conv_bn_act(
        x, conv.weight, conv.bias, bn.weight, bn.bias, rm, rv, nbt, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, transposed=transposed,
        output_padding=getattr(conv, "output_padding", 0), training=training, momentum=momentum, eps=bn.eps,
        act=act, negative_slope=slope, update_in_place=update_in_place)


CASES = [  # transposed, cin, cout, k, stride, padding, groups, bias, H, W
    (False, 3, 8, 3, 1, 1, 1, False, 7, 13),
    (False, 6, 6, 3, 2, 1, 6, True, 9, 9),  # depthwise
    (True, 8, 3, 4, 2, 1, 1, False, 4, 5),  # DCGAN-style up-conv, odd C out
    (True, 4, 6, 3, 1, 0, 2, True, 3, 3),
]


# every case, every activation and both momentum rules, without the full cross product
TRAIN = [(0, "relu", 0.1), (0, "none", None), (1, "leaky_relu", 0.1), (1, "relu", None), (2, "relu", 0.1),
         (2, "leaky_relu", None), (3, "none", 0.1), (3, "relu", None)]


@pytest.mark.parametrize("ci,act,momentum", TRAIN)
def test_train_steps_match_torch_nn(ci, act, momentum):
    transposed, cin, cout, k, stride, padding, groups, bias, H, W = CASES[ci]
    slope = 0.2
    seq = _seq(transposed, cin, cout, k, stride, padding, groups, bias, momentum, act, slope).train()
    mine = copy.deepcopy(seq)
    bufs = (mine[1].running_mean.clone(), mine[1].running_var.clone(), mine[1].num_batches_tracked.clone())
    for _ in range(3):
        x = randn(2, cin, H, W, dtype=F64, requires_grad=True)
        y_nn = seq(x)
        before = [b.clone() for b in bufs]
        y, new = _ref_call(mine, x, True, momentum, act, slope, transposed, buffers=bufs)
        assert all(torch.equal(b, b0) for b, b0 in zip(bufs, before)), "the oracle mutated its inputs"
        bufs = new
        assert_close(y, y_nn, F64, name="y")
        dy = randn(*y.shape, dtype=F64)
        params_nn = [x, *seq.parameters()]
        params = [x, *mine.parameters()]
        g_nn = torch.autograd.grad(y_nn, params_nn, dy)
        g = torch.autograd.grad(y, params, dy)
        names = ["x", "conv.weight"] + (["conv.bias"] if bias else []) + ["bn.weight", "bn.bias"]
        for a, b, name in zip(g, g_nn, names):
            if name == "conv.bias":  # batch statistics remove a per-channel shift: analytically zero
                assert a.abs().max() < 1e-9 and b.abs().max() < 1e-9, name
                continue
            assert_close(a, b, F64, name=f"grad {name}")
    assert_close(bufs[0], seq[1].running_mean, F64, name="running_mean")
    assert_close(bufs[1], seq[1].running_var, F64, name="running_var")
    assert int(bufs[2]) == int(seq[1].num_batches_tracked) == 3


@pytest.mark.parametrize("case,act", [(CASES[0], "relu"), (CASES[1], "leaky_relu"), (CASES[2], "relu"),
                                      (CASES[3], "leaky_relu")])
def test_eval_and_fold_match_torch_nn(case, act):
    transposed, cin, cout, k, stride, padding, groups, bias, H, W = case
    seq = _seq(transposed, cin, cout, k, stride, padding, groups, bias, 0.1, act, 0.1).eval()
    x = randn(1, cin, H, W, dtype=F64)
    y_nn = seq(x)
    y, new = _ref_call(seq, x, False, 0.1, act, 0.1, transposed)
    assert new is None
    assert_close(y, y_nn, F64, name="eval y")
    conv, bn = seq[0], seq[1]
    w, b = ref.fold(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps,
                    transposed=transposed, groups=conv.groups)
    z = ref.conv(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups, transposed,
                 getattr(conv, "output_padding", 0))
    assert_close(ref.activation(z, act, 0.1), y_nn, F64, name="folded y")


def test_update_in_place_and_no_running_stats():
    seq = _seq(False, 3, 5, 3, 1, 1, 1, False, 0.1, "relu", 0.0).train()
    mine = copy.deepcopy(seq)
    x = randn(4, 3, 6, 6, dtype=F64)
    seq(x)
    _ref_call(mine, x, True, 0.1, "relu", 0.0, False, update_in_place=True)
    assert_close(mine[1].running_mean, seq[1].running_mean, F64)
    assert_close(mine[1].running_var, seq[1].running_var, F64)
    assert int(mine[1].num_batches_tracked) == 1
    # track_running_stats=False: batch statistics in train and in eval
    seq2 = _seq(False, 3, 5, 3, 1, 1, 1, False, 0.1, "relu", 0.0, track=False).eval()
    y_nn = seq2(x)
    y, new = ref.conv_bn_act(x, seq2[0].weight, None, seq2[1].weight, seq2[1].bias, training=False, padding=1)
    assert new is None
    assert_close(y, y_nn, F64)


def test_single_value_per_channel_raises_like_batchnorm():
    z = randn(1, 4, 1, 1, dtype=F64)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        nn.BatchNorm2d(4, dtype=F64).train()(z)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        ref.bn_act(z, None, None, training=True)
