"""fastbig conv + BatchNorm + activation: the fused op and the drop-in blocks vs the float64
oracle (fastbig.reference.conv_bn_relu) and vs torch.nn's Sequential they replace."""
import contextlib
import copy
import io

import pytest
import torch
from torch import nn

import fastbig
from fastbig.nn import ConvBn2d, ConvBnLeakyReLU2d, ConvBnReLU2d, ConvTransposeBnReLU2d
from fastbig.reference import conv_bn_relu as ref
from conftest import DEVICES, HAS_CUDA, TOL, assert_close, has_extension, randn, rel_err

pytestmark = has_extension
F64 = torch.float64


@contextlib.contextmanager
def nan_poisoned_empty():
    """Every torch.empty (the kernels' outputs included) starts filled with NaN, so an element
    a kernel fails to write shows up as NaN."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.utils.deterministic.fill_uninitialized_memory = old_fill


def _randomize_bn(bn):
    C = bn.num_features
    with torch.no_grad():
        if bn.affine:
            bn.weight.copy_(randn(C) * 0.5 + 1.0)
            bn.bias.copy_(randn(C))
        if bn.track_running_stats:
            bn.running_mean.copy_(randn(C) * 0.3)
            bn.running_var.copy_(torch.rand(C) + 0.5)
    return bn


def _act_of(block):
    act = block.act
    if act is None:
        return "none", 0.01
    if isinstance(act, nn.LeakyReLU):
        return "leaky_relu", act.negative_slope
    return "relu", 0.01


def _ref_state(block):
    """float64 copies of the block's parameters and buffers, for the oracle."""
    conv, bn = block.conv, block.bn
    d = lambda t: None if t is None else t.detach().to(F64).clone().requires_grad_(t.requires_grad)  # noqa: E731
    b = lambda t: None if t is None else t.detach().clone().to(F64 if t.is_floating_point() else t.dtype)  # noqa
    return {"conv_weight": d(conv.weight), "conv_bias": d(conv.bias), "bn_weight": d(bn.weight),
            "bn_bias": d(bn.bias), "running_mean": b(bn.running_mean), "running_var": b(bn.running_var),
            "num_batches_tracked": b(bn.num_batches_tracked)}


def _ref_forward(block, st, x64, training):
    conv, bn = block.conv, block.bn
    act, slope = _act_of(block)
    track = training and bn.track_running_stats
    return ref.conv_bn_act(
        x64, st["conv_weight"], st["conv_bias"], st["bn_weight"], st["bn_bias"],
        st["running_mean"] if (track or not training) else None,
        st["running_var"] if (track or not training) else None,
        st["num_batches_tracked"] if track else None,
        stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
        transposed=isinstance(conv, nn.ConvTranspose2d), output_padding=getattr(conv, "output_padding", 0),
        training=training or not bn.track_running_stats, momentum=bn.momentum, eps=bn.eps, act=act,
        negative_slope=slope)


def _grads_close(block, st, x, x64, y, y64, dtype, training):
    dy = randn(*y.shape, dtype=dtype)
    names = ["x", "conv_weight", "conv_bias", "bn_weight", "bn_bias"]
    mine = [x, block.conv.weight, block.conv.bias, block.bn.weight, block.bn.bias]
    refs = [x64, st["conv_weight"], st["conv_bias"], st["bn_weight"], st["bn_bias"]]
    keep = [i for i, t in enumerate(mine) if t is not None and t.requires_grad]
    g = torch.autograd.grad(y, [mine[i] for i in keep], dy)
    g64 = torch.autograd.grad(y64, [refs[i] for i in keep], dy.to(F64))
    for a, b, i in zip(g, g64, keep):
        if names[i] == "conv_bias" and training:
            # batch statistics cancel any per-channel shift: the gradient is analytically zero
            scale = max(1.0, g64[0].norm().item())
            assert torch.isfinite(a).all() and a.norm().item() <= 1e-4 * scale, "grad conv_bias not ~0"
            continue
        assert_close(a, b, dtype, name=f"grad {names[i]}")


# transposed/cls, in, out, kernel, extra conv kwargs, input H, W, activation kwargs
BLOCKS = {
    "relu3x3_c3": (ConvBnReLU2d, 5, 3, 3, dict(padding=1), (7, 13)),
    "relu1x1_bias": (ConvBnReLU2d, 8, 16, 1, dict(bias=True), (5, 6)),
    "leaky_depthwise": (ConvBnLeakyReLU2d, 6, 6, 3, dict(stride=2, padding=1, groups=6, negative_slope=0.2),
                        (9, 8)),
    "bn_only_dilated": (ConvBn2d, 4, 7, 3, dict(padding=2, dilation=2, bias=True), (6, 6)),
    "transposed_dcgan": (ConvTransposeBnReLU2d, 8, 5, 4, dict(stride=2, padding=1), (4, 5)),
    "transposed_groups": (ConvTransposeBnReLU2d, 4, 6, 3, dict(stride=2, output_padding=1, groups=2, bias=True),
                          (3, 3)),
    "hw1": (ConvBnReLU2d, 4, 6, 1, dict(), (1, 1)),
}


def _make(name, dtype=torch.float32, device="cpu", momentum=0.1):
    cls, cin, cout, k, kw, hw = BLOCKS[name]
    block = cls(cin, cout, k, momentum=momentum, **kw).to(device=device, dtype=dtype)
    _randomize_bn(block.bn)
    return block, cin, hw


TRAIN = [("relu3x3_c3", False, None), ("relu3x3_c3", True, 0.1), ("relu1x1_bias", False, 0.1),
         ("leaky_depthwise", True, None), ("bn_only_dilated", False, 0.1), ("transposed_dcgan", False, None),
         ("transposed_groups", True, 0.1), ("hw1", False, None)]


@pytest.mark.parametrize("name,channels_last,momentum", TRAIN)
def test_train_steps_vs_float64_oracle(name, channels_last, momentum):
    """Outputs, every gradient and the running statistics after several steps, momentum 0.1 and
    None, NCHW and channels_last; outputs start as NaN."""
    block, cin, (H, W) = _make(name, momentum=momentum)
    block.train()
    st = _ref_state(block)
    N = 4 if name != "hw1" else 5
    for step in range(3):
        x = randn(N, cin, H, W)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        x.requires_grad_(True)
        x0 = x.detach().clone()
        x64 = x.detach().to(F64).requires_grad_(True)
        with nan_poisoned_empty():
            y = block(x)
        y64, new = _ref_forward(block, st, x64, True)
        st.update(running_mean=new.running_mean, running_var=new.running_var,
                  num_batches_tracked=new.num_batches_tracked)
        assert y.dtype == torch.float32 and y.shape == y64.shape
        if channels_last and H * W > 1 and block.conv.out_channels > 1:
            assert y.is_contiguous(memory_format=torch.channels_last)
        assert_close(y, y64, name=f"y step {step}")
        with nan_poisoned_empty():
            _grads_close(block, st, x, x64, y, y64, torch.float32, True)
        assert torch.equal(x.detach(), x0), "the input was written"
    bn = block.bn
    assert_close(bn.running_mean, st["running_mean"], name="running_mean")
    assert_close(bn.running_var, st["running_var"], name="running_var")
    assert int(bn.num_batches_tracked) == int(st["num_batches_tracked"]) == 3


@pytest.mark.parametrize("name", ["relu3x3_c3", "leaky_depthwise", "bn_only_dilated", "transposed_dcgan"])
def test_eval_folded_vs_float64_oracle_batch_of_one(name):
    block, cin, (H, W) = _make(name)
    block.eval()
    st = _ref_state(block)
    x = randn(1, cin, H, W, requires_grad=True)
    x64 = x.detach().to(F64).requires_grad_(True)
    y = block(x)
    y64, _ = _ref_forward(block, st, x64, False)
    assert_close(y, y64, name="eval y")
    _grads_close(block, st, x, x64, y, y64, torch.float32, False)  # fold is differentiable


@pytest.mark.parametrize("cls,act", [(ConvBnReLU2d, nn.ReLU()), (ConvBnLeakyReLU2d, nn.LeakyReLU(0.3)),
                                     (ConvBn2d, None), (ConvTransposeBnReLU2d, nn.ReLU())])
def test_drop_in_for_torch_sequential_float64(cls, act):
    """As a user would: build torch.nn's Sequential, load its state_dict, compare in float64 in
    train (several steps) and eval."""
    conv = (nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1) if cls is ConvTransposeBnReLU2d
            else nn.Conv2d(6, 4, 3, padding=1))
    seq = nn.Sequential(*[m for m in (conv, _randomize_bn(nn.BatchNorm2d(4)), act) if m is not None]).double()
    kw = dict(stride=2, padding=1, output_padding=1) if cls is ConvTransposeBnReLU2d else dict(padding=1)
    kw["bias"] = True
    if cls is ConvBnLeakyReLU2d:
        kw["negative_slope"] = 0.3
    block = cls(6, 4, 3, **kw).double()
    assert list(block.state_dict()) == list(seq.state_dict())
    block.load_state_dict(seq.state_dict())
    for mode in ("train", "train", "eval"):
        seq.train(mode == "train")
        block.train(mode == "train")
        x = randn(3, 6, 5, 7, dtype=F64, requires_grad=True)
        y_nn = seq(x)
        y = block(x)
        assert_close(y, y_nn, F64, name=f"{mode} y")
        dy = randn(*y.shape, dtype=F64)
        g_nn = torch.autograd.grad(y_nn, [x, *seq.parameters()], dy)
        g = torch.autograd.grad(y, [x, *block.parameters()], dy)
        for i, (a, b) in enumerate(zip(g, g_nn)):
            if i == 2 and mode == "train":  # conv bias under batch statistics: analytically 0
                assert a.abs().max() < 1e-9 and b.abs().max() < 1e-9
                continue
            assert_close(a, b, F64, name=f"{mode} grad {i}")
    for k, v in seq.state_dict().items():
        assert_close(block.state_dict()[k].double(), v.double(), F64, name=k)


def test_from_modules_shares_or_copies():
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    shared = ConvBnReLU2d.from_modules(conv, bn)
    assert shared.conv is conv and shared.bn is bn and isinstance(shared.act, nn.ReLU)
    copied = ConvBnLeakyReLU2d.from_modules(conv, bn, nn.LeakyReLU(0.2), copy=True)
    assert copied.conv is not conv and torch.equal(copied.conv.weight, conv.weight)
    assert copied.act.negative_slope == 0.2
    assert list(ConvBn2d.from_modules(conv, bn).state_dict()) == list(nn.Sequential(conv, bn).state_dict())
    with pytest.raises(TypeError, match="ConvTranspose2d"):
        ConvTransposeBnReLU2d.from_modules(conv, bn)
    with pytest.raises(ValueError, match="num_features"):
        ConvBnReLU2d.from_modules(conv, nn.BatchNorm2d(5))
    with pytest.raises(TypeError, match="nn.ReLU"):
        ConvBnReLU2d.from_modules(conv, bn, nn.Tanh())
    # a shared block trains the original layers' buffers
    shared.train()(randn(2, 3, 5, 5))
    assert int(bn.num_batches_tracked) == 1


def test_track_running_stats_false_and_padding_mode():
    block = ConvBnReLU2d(3, 5, 3, padding=1, padding_mode="reflect", track_running_stats=False)
    seq = nn.Sequential(copy.deepcopy(block.conv), copy.deepcopy(block.bn), nn.ReLU()).double()
    block.double()
    for mode in (True, False):  # batch statistics in train and in eval
        x = randn(2, 3, 6, 7, dtype=F64)
        assert_close(block.train(mode)(x), seq.train(mode)(x), F64)


def test_affine_false_train_and_eval_float64():
    block = ConvBnLeakyReLU2d(3, 5, 3, stride=2, affine=False, negative_slope=0.05).double()
    _randomize_bn(block.bn)
    seq = nn.Sequential(copy.deepcopy(block.conv), copy.deepcopy(block.bn), nn.LeakyReLU(0.05))
    for mode in (True, True, False):
        x = randn(3, 3, 9, 7, dtype=F64)
        assert_close(block.train(mode)(x), seq.train(mode)(x), F64, name=f"train={mode}")
    assert_close(block.bn.running_var, seq[1].running_var, F64)


def test_fold_cache_refreshes_after_load_state_dict_and_optimizer_step():
    block, cin, (H, W) = _make("relu3x3_c3")
    x = randn(2, cin, H, W)
    block.eval()
    with torch.no_grad():
        y1 = block(x)
        cache = block.__dict__["_fold_cache"]
        assert torch.equal(block(x), y1) and block.__dict__["_fold_cache"] is cache  # cached
    other, _, _ = _make("relu3x3_c3")
    block.load_state_dict(other.state_dict())
    with torch.no_grad():
        y2 = block(x)
    y_ref, _ = _ref_forward(block, _ref_state(block), x.double(), False)
    assert_close(y2, y_ref, name="after load_state_dict")
    # train a step with an optimizer (changes weights and running stats), then eval again
    opt = torch.optim.SGD(block.parameters(), lr=0.5)
    block.train()
    block(randn(4, cin, H, W)).square().sum().backward()
    opt.step()
    block.eval()
    with torch.no_grad():
        y3 = block(x)
    y_ref, _ = _ref_forward(block, _ref_state(block), x.double(), False)
    assert_close(y3, y_ref, name="after optimizer step")
    with torch.no_grad():
        block.bn.eps = 1e-1  # eps is in the key too
        y_ref, _ = _ref_forward(block, _ref_state(block), x.double(), False)
        assert_close(block(x), y_ref, name="after eps change")


@contextlib.contextmanager
def _count_onednn(monkeypatch):
    """Counts the calls of the fused oneDNN conv + activation path (the real one still runs)."""
    calls = []
    real = fastbig.ops.conv_bn_relu._onednn_conv_act

    def spy(*a, **k):
        calls.append(a[1].layout)  # the weight's layout: torch.strided (dense) or torch._mkldnn (packed)
        return real(*a, **k)
    monkeypatch.setattr(fastbig.ops.conv_bn_relu, "_onednn_conv_act", spy)
    yield calls


@contextlib.contextmanager
def _count_conv1x1(monkeypatch):
    """Counts the calls of the blocked 1x1 GEMM + epilogue path (the real one still runs)."""
    calls = []
    real = fastbig.ops.conv_bn_relu._conv1x1_act

    def spy(*a, **k):
        calls.append(tuple(a[0].shape))
        return real(*a, **k)
    monkeypatch.setattr(fastbig.ops.conv_bn_relu, "_conv1x1_act", spy)
    yield calls


def _conv1x1_path(block, x):
    """Whether eval without autograd takes fastbig::conv1x1_act: a plain 1x1 conv on NCHW input."""
    c = block.conv
    return (not block._transposed and c.kernel_size == (1, 1) and c.stride == (1, 1) and c.padding == (0, 0)
            and c.groups == 1 and x.is_contiguous() and torch.backends.mkl.is_available())


def _seq_twin(block):
    """torch.nn's Sequential of deep copies of the block's layers: what the block replaces."""
    return nn.Sequential(*[copy.deepcopy(m) for m in block]).eval()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_eval_inference_fused_conv_act_vs_float64_oracle(name, channels_last, monkeypatch):
    """Eval without autograd: folded BN, conv and activation in one oneDNN primitive (weight
    prepacked for channels_last inputs). Output vs the float64 oracle, and the same memory format
    torch.nn's Sequential gives; every block (leaky slope, groups/depthwise, dilation, bias,
    ConvTranspose, 1x1) in NCHW and channels_last; outputs start as NaN."""
    block, cin, (H, W) = _make(name)
    block.eval()
    seq = _seq_twin(block)
    x = randn(3, cin, H, W)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x0 = x.clone()
    # these shapes are below the size where NCHW convs take oneDNN (next test): lower it here
    monkeypatch.setattr(fastbig.ops.conv_bn_relu, "_ONEDNN_MIN_FLOP", 0)
    with _count_onednn(monkeypatch) as calls, _count_conv1x1(monkeypatch) as calls1x1, torch.no_grad(), \
            nan_poisoned_empty():
        y = block(x)
        y_nn = seq(x)
    y64, _ = _ref_forward(block, _ref_state(block), x.double(), False)
    assert_close(y, y64, name="eval y")
    strides = lambda t: [st for st, n in zip(t.stride(), t.shape) if n > 1]  # noqa: E731 (size-1 dims: any)
    assert strides(y) == strides(y_nn), f"layout {y.stride()} vs torch.nn's {y_nn.stride()}"
    assert torch.equal(x, x0), "the input was written"
    one_by_one = _conv1x1_path(block, x)
    assert calls1x1 == ([tuple(x.shape)] if one_by_one else []), calls1x1
    if torch.backends.mkldnn.is_available() and not one_by_one:
        packed = channels_last and not block._transposed and not x.is_contiguous()
        assert calls == [torch._mkldnn if packed else torch.strided], calls


@pytest.mark.parametrize("name", ["relu3x3_c3", "leaky_depthwise", "transposed_dcgan"])
def test_eval_small_nchw_conv_takes_torch_conv(name, monkeypatch):
    """A small NCHW conv (under ~50 MFLOP) skips oneDNN's fused primitive, which reorders the
    weight on every call: torch's conv and the activation in place, still right."""
    block, cin, (H, W) = _make(name)
    block.eval()
    x = randn(2, cin, H, W)
    with _count_onednn(monkeypatch) as calls, torch.no_grad(), nan_poisoned_empty():
        y = block(x)
    y64, _ = _ref_forward(block, _ref_state(block), x.double(), False)
    assert_close(y, y64, name="eval y")
    assert calls == [], calls


@pytest.mark.parametrize("name", ["relu3x3_c3", "transposed_groups"])
def test_eval_inference_model_moved_to_channels_last(name, monkeypatch):
    """model.to(memory_format=channels_last) makes the conv weight channels_last too: the fused
    oneDNN path still runs for channels_last inputs; NCHW inputs get torch's layout choice."""
    block, cin, (H, W) = _make(name)
    block.eval().to(memory_format=torch.channels_last)
    seq = _seq_twin(block)
    strides = lambda t: [st for st, n in zip(t.stride(), t.shape) if n > 1]  # noqa: E731
    for cl in (True, False):
        x = randn(2, cin, H, W)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        with _count_onednn(monkeypatch) as calls, torch.no_grad():
            y, y_nn = block(x), seq(x)
        y64, _ = _ref_forward(block, _ref_state(block), x.double(), False)
        assert_close(y, y64, name=f"channels_last input={cl}")
        assert strides(y) == strides(y_nn)
        if torch.backends.mkldnn.is_available():
            assert len(calls) == (1 if cl else 0), calls


def test_eval_inference_1x1_threads_and_no_onednn_paths(monkeypatch):
    """The paths beside oneDNN's: a 1x1 NCHW conv with one thread and with two (the blocked GEMM
    + epilogue op), oneDNN switched off (channels_last: torch's conv, then bias + ReLU in one
    pass), the reference backend, and autograd on (the differentiable fold): each right."""
    block, cin, (H, W) = _make("relu1x1_bias")
    block.eval()
    x = randn(2, cin, H, W)
    y64, _ = _ref_forward(block, _ref_state(block), x.double(), False)
    threads = torch.get_num_threads()
    mkl = torch.backends.mkl.is_available()
    with _count_onednn(monkeypatch) as calls, _count_conv1x1(monkeypatch) as calls1x1:
        for n in (1, 2):
            try:
                torch.set_num_threads(n)
                with torch.no_grad():
                    assert_close(block(x), y64, name=f"{n} threads")
            finally:
                torch.set_num_threads(threads)
        assert len(calls1x1) == (2 if mkl else 0), calls1x1
        enabled = torch.backends.mkldnn.enabled
        try:
            torch.backends.mkldnn.enabled = False
            with torch.no_grad():
                assert_close(block(x), y64, name="oneDNN off")
                assert_close(block(x.to(memory_format=torch.channels_last)), y64, name="oneDNN off, channels_last")
        finally:
            torch.backends.mkldnn.enabled = enabled
        assert len(calls1x1) == (3 if mkl else 0), calls1x1  # NCHW: not oneDNN's, still taken
        with fastbig.backends.use("reference"), torch.no_grad():
            assert_close(block(x), y64, name="reference backend")
        y = block(x)  # autograd on: not the fused ops, which have no backward
        assert y.requires_grad
        assert calls == [] and len(calls1x1) == (3 if mkl else 0), (calls, calls1x1)
    assert_close(y, y64, name="with autograd")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv1x1_act_op_vs_float64_oracle(dtype):
    """fastbig::conv1x1_act alone: odd channel counts (3, 13), N 1, 7x13 pixels, and a shape
    whose output splits into several cache blocks with a short last one (100->90 channels,
    23x29: 224-column blocks), one image split between 3 threads (9x11: two 64-column blocks);
    NCHW, channels_last, a strided non-contiguous view; every activation with and without bias;
    outputs start as NaN; the input is not written."""
    if not torch.backends.mkl.is_available():
        pytest.skip("torch built without MKL: the op has no BLAS")
    shapes = [(1, 3, 13, 7, 13, 1), (2, 13, 3, 7, 13, 1), (2, 100, 90, 23, 29, 1), (1, 5, 6, 9, 11, 3)]
    n_threads = torch.get_num_threads()
    try:
        for N, cin, cout, H, W, nt in shapes:
            torch.set_num_threads(nt)
            x = randn(N, cin, H, W, dtype=dtype)
            w, b = randn(cout, cin, 1, 1, dtype=dtype), randn(cout, dtype=dtype)
            z64 = torch.nn.functional.conv2d(x.double(), w.double())
            views = {"nchw": x, "channels_last": x.contiguous(memory_format=torch.channels_last),
                     "strided": torch.stack([x, -x], -1).flatten(-2)[..., ::2]}
            for act, slope in (("none", 0.0), ("relu", 0.0), ("leaky_relu", 0.3)):
                for bias in (None, b):
                    u = z64 if bias is None else z64 + bias.double().view(1, -1, 1, 1)
                    y64 = {"none": u, "relu": u.relu(), "leaky_relu": torch.nn.functional.leaky_relu(u, slope)}[act]
                    for kind, xv in views.items():
                        x0 = xv.clone()
                        with nan_poisoned_empty():
                            y = torch.ops.fastbig.conv1x1_act(xv, w, bias, fastbig.ops.conv_bn_relu.ACTIVATIONS[act],
                                                              slope)
                        assert_close(y, y64, name=f"{(N, cin, cout, H, W)} {act} bias={bias is not None} {kind}")
                        assert torch.equal(xv, x0)
                        assert y.is_contiguous(memory_format=torch.channels_last if kind == "channels_last"
                                               else torch.contiguous_format)
    finally:
        torch.set_num_threads(n_threads)


def test_conv1x1_eval_routes_and_falls_back(monkeypatch):
    """fastbig.ops.conv_bn_act in eval: a plain 1x1 conv takes the blocked GEMM op; stride 2,
    padding 1, groups 2 and a transposed 1x1 fall back to the other paths; each vs the float64
    oracle; bad inputs to the op raise naming the argument."""
    C, K = 4, 6
    vecs = dict(conv_bias=randn(K), bn_weight=randn(K) * 0.5 + 1, bn_bias=randn(K), running_mean=randn(K) * 0.3,
                running_var=torch.rand(K) + 0.5)
    d64 = {k: v.double() for k, v in vecs.items()}
    mkl = torch.backends.mkl.is_available()
    cases = [(dict(), True), (dict(stride=2), False), (dict(padding=1), False), (dict(groups=2), False),
             (dict(transposed=True), False)]
    for kw, fused in cases:
        g = kw.get("groups", 1)
        w = randn(C, K // g, 1, 1) if kw.get("transposed") else randn(K, C // g, 1, 1)
        x = randn(2, C, 7, 5)
        with _count_conv1x1(monkeypatch) as calls, torch.no_grad():
            y = fastbig.ops.conv_bn_act(x, w, **vecs, **kw, training=False, activation="leaky_relu",
                                        negative_slope=0.2)
        y64, _ = ref.conv_bn_act(x.double(), w.double(), **d64, **kw, training=False, act="leaky_relu",
                                 negative_slope=0.2)
        assert_close(y, y64, name=str(kw))
        assert len(calls) == (1 if fused and mkl else 0), (kw, calls)
    if mkl:
        x, w = randn(2, C, 3, 3), randn(K, C, 1, 1)
        with pytest.raises(RuntimeError, match="weight must be"):
            torch.ops.fastbig.conv1x1_act(x, randn(K, C + 1, 1, 1), None, 1, 0.0)
        with pytest.raises(RuntimeError, match="bias must be"):
            torch.ops.fastbig.conv1x1_act(x, w, randn(K + 1), 1, 0.0)
        with pytest.raises(RuntimeError, match="act must be"):
            torch.ops.fastbig.conv1x1_act(x, w, None, 7, 0.0)
        with pytest.raises(RuntimeError, match="float32 or float64"):
            torch.ops.fastbig.conv1x1_act(x.half(), w.half(), None, 1, 0.0)


def test_prepacked_weight_cache_refreshes_with_the_fold(monkeypatch):
    """The prepacked folded weight (channels_last inputs) is reused while nothing changes, and
    rebuilt after an in-place parameter edit, a running-stat edit, load_state_dict, an optimizer
    step and a new input size; deepcopy and pickling leave it behind (opaque oneDNN tensor)."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN not built")
    block, cin, (H, W) = _make("leaky_depthwise")
    block.eval()
    cl = torch.channels_last
    x = randn(2, cin, H, W).to(memory_format=cl)

    def check(what, inp=x):
        with torch.no_grad():
            y = block(inp)
        y64, _ = _ref_forward(block, _ref_state(block), inp.double(), False)
        assert_close(y, y64, name=what)
        return block.__dict__["_pack_cache"]

    first = check("first")
    assert check("again") is first  # cached
    with torch.no_grad():
        block.conv.weight.mul_(-1.5)
    assert check("after in-place conv.weight edit") is not first
    with torch.no_grad():
        block.bn.running_var.mul_(3.0)
    check("after in-place running_var edit")
    other, _, _ = _make("leaky_depthwise")
    block.load_state_dict(other.state_dict())
    check("after load_state_dict")
    opt = torch.optim.SGD(block.parameters(), lr=0.5)
    block.train()
    block(randn(4, cin, H, W)).square().sum().backward()
    opt.step()
    block.eval()
    check("after optimizer step")
    check("new input size", randn(1, cin, H + 2, W + 1).to(memory_format=cl))
    twin = copy.deepcopy(block)
    assert "_pack_cache" not in twin.__dict__ and "_fold_cache" not in twin.__dict__
    buf = io.BytesIO()
    torch.save(block, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(twin(x), block(x)) and torch.equal(loaded(x), block(x))


@pytest.mark.parametrize("transposed", [False, True])
def test_op_eval_fused_conv_act_vs_float64_oracle(transposed):
    """fastbig.ops.conv_bn_act in eval without autograd (no module, so no cache): leaky slope,
    groups, stride, NCHW and channels_last."""
    C, K, g = 4, 6, 2
    w = randn(C, K // g, 3, 3) if transposed else randn(K, C // g, 3, 3)
    vecs = dict(conv_bias=randn(K), bn_weight=randn(K) * 0.5 + 1, bn_bias=randn(K), running_mean=randn(K) * 0.3,
                running_var=torch.rand(K) + 0.5)
    kw = dict(stride=2, padding=1, groups=g, transposed=transposed, output_padding=1 if transposed else 0,
              training=False, eps=1e-3, activation="leaky_relu", negative_slope=0.3)
    for cl in (False, True):
        x = randn(2, C, 5, 7)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        with torch.no_grad(), nan_poisoned_empty():
            y = fastbig.ops.conv_bn_act(x, w, **vecs, **kw)
        y64, _ = ref.conv_bn_act(x.double(), w.double(), **{k: v.double() for k, v in vecs.items()},
                                 **{k: v for k, v in kw.items() if k not in ("activation", "negative_slope")},
                                 act="leaky_relu", negative_slope=0.3)
        assert_close(y, y64, name=f"channels_last={cl}")


def test_one_value_per_channel_raises_like_batchnorm():
    block = ConvBnReLU2d(3, 4, 1).train()
    x = randn(1, 3, 1, 1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training") as e1:
        block(x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training") as e2:
        nn.Sequential(block.conv, block.bn, nn.ReLU())(x)
    assert str(e1.value).split(",")[0] == str(e2.value).split(",")[0]
    assert block.eval()(x).shape == (1, 4, 1, 1)  # eval takes one value


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "none"])
def test_gradcheck_float64(act):
    z = randn(2, 3, 3, 4, dtype=F64, requires_grad=True)
    w = randn(3, dtype=F64, requires_grad=True)
    b = randn(3, dtype=F64, requires_grad=True)
    f = lambda z, w, b: fastbig.ops.bn_act(z, w, b, activation=act, negative_slope=0.3)  # noqa: E731
    assert torch.autograd.gradcheck(f, (z, w, b))
    zc = z.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    assert torch.autograd.gradcheck(f, (zc, w, b), fast_mode=True)
    x = randn(2, 2, 4, 3, dtype=F64, requires_grad=True)
    cw = randn(3, 2, 3, 3, dtype=F64, requires_grad=True)
    g = lambda x, cw: fastbig.ops.conv_bn_act(x, cw, None, w.detach(), b.detach(), padding=1,  # noqa: E731
                                              activation=act)
    assert torch.autograd.gradcheck(g, (x, cw), fast_mode=True)


def test_double_backward_goes_through_a_differentiable_path():
    z = randn(2, 3, 3, 2, dtype=F64, requires_grad=True)
    w, b = randn(3, dtype=F64, requires_grad=True), randn(3, dtype=F64, requires_grad=True)
    f = lambda z, w, b: fastbig.ops.bn_act(z, w, b, activation="leaky_relu", negative_slope=0.3)  # noqa: E731
    assert torch.autograd.gradgradcheck(f, (z, w, b), fast_mode=True)


@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
def test_nan_propagates_like_torch(act):
    z = randn(3, 4, 5, 5)
    z[1, 2, 3, 4] = float("nan")  # channel 2's statistics go NaN, as in BatchNorm2d
    for zz in (z, z.to(memory_format=torch.channels_last)):
        y = fastbig.ops.bn_act(zz, activation=act)
        y_ref, _ = ref.bn_act(zz.double(), None, None, act=act)
        assert torch.equal(y.isnan(), y_ref.isnan()) and y[:, 2].isnan().all() and not y[:, 0].isnan().any()


def test_opcheck():
    z = randn(3, 5, 4, 3)
    w, b = randn(5), randn(5)
    for zz, act in ((z, 1), (z.to(memory_format=torch.channels_last), 2)):
        torch.library.opcheck(torch.ops.fastbig.bn_act_forward,
                              (zz.clone().requires_grad_(True), w.clone().requires_grad_(True), b, 1e-5, act, 0.2))
        y, mean, invstd, var = torch.ops.fastbig.bn_act_forward(zz, w, b, 1e-5, act, 0.2)
        torch.library.opcheck(torch.ops.fastbig.bn_act_backward,
                              (randn(*zz.shape), zz, mean, invstd, w, b, act, 0.2))
    torch.library.opcheck(torch.ops.fastbig.bn_act_forward, (z, None, None, 1e-3, 0, 0.0))
    if torch.backends.mkl.is_available():
        for xx in (randn(2, 5, 3, 4), randn(2, 5, 3, 4).to(memory_format=torch.channels_last)):
            torch.library.opcheck(torch.ops.fastbig.conv1x1_act, (xx, randn(6, 5, 1, 1), randn(6), 2, 0.2))
    mean, var = randn(5), torch.rand(5) + 0.1
    for momentum in (0.1, None):
        torch.library.opcheck(torch.ops.fastbig.bn_update_running_stats_,
                              (randn(5), torch.rand(5) + 0.5, torch.tensor(2), mean, var, 36, momentum))


def test_running_stats_update_op_matches_batchnorm_rule():
    rm, rv, nbt = randn(4), torch.rand(4) + 0.5, torch.tensor(4)
    mean, var = randn(4), torch.rand(4)
    exp_m, exp_v = rm * (1 - 1 / 5) + mean / 5, rv * (1 - 1 / 5) + var * 10 / 9 / 5
    torch.ops.fastbig.bn_update_running_stats_(rm, rv, nbt, mean, var, 10, None)
    assert int(nbt) == 5
    assert_close(rm, exp_m)
    assert_close(rv, exp_v)


def test_torch_compile_fullgraph_train_and_eval():
    block, cin, (H, W) = _make("relu1x1_bias")
    twin = copy.deepcopy(block)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    for mode in (True, False):
        block.train(mode)
        twin.train(mode)
        x = randn(3, cin, H, W, requires_grad=True)
        xt = x.detach().clone().requires_grad_(True)
        y, yt = compiled(x), twin(xt)
        assert_close(y, yt.detach().double(), name=f"compiled y (train={mode})")
        dy = randn(*y.shape)
        assert_close(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(yt, xt, dy)[0].double(),
                     name="compiled grad x")
    assert int(block.bn.num_batches_tracked) == int(twin.bn.num_batches_tracked) == 1
    assert_close(block.bn.running_mean, twin.bn.running_mean.double())
    assert_close(block.bn.running_var, twin.bn.running_var.double())


def test_torch_compile_inductor_op():
    z = randn(4, 6, 5, 5, requires_grad=True)
    w, b = randn(6, requires_grad=True), randn(6, requires_grad=True)
    rm, rv, nbt = torch.zeros(6), torch.ones(6), torch.tensor(0)
    rm2, rv2, nbt2 = rm.clone(), rv.clone(), nbt.clone()
    f = lambda z, w, b, rm, rv, nbt: fastbig.ops.bn_act(z, w, b, rm, rv, nbt, momentum=None)  # noqa: E731
    y = torch.compile(f, fullgraph=True)(z, w, b, rm, rv, nbt)
    y_e = f(z, w, b, rm2, rv2, nbt2)
    assert_close(y, y_e.detach().double())
    y.sum().backward()
    assert_close(rm, rm2.double())
    assert_close(rv, rv2.double())
    assert int(nbt) == int(nbt2) == 1


def test_welford_stable_for_large_offset_and_count():
    """Data with mean 1e3 and spread 1 in float32: sum/sum-of-squares would lose every digit of
    the variance; the Welford/Chan statistics keep it."""
    z = (randn(8, 2, 160, 160) + 1000.0).contiguous()
    # float64 runs the per-element Welford update (the CUDA threads' code), float32 the chunked one
    for zz in (z, z.to(memory_format=torch.channels_last), z.double(), z.double().to(memory_format=torch.channels_last)):
        y, mean, invstd, var = torch.ops.fastbig.bn_act_forward(zz, None, None, 1e-5, 0, 0.0)
        z64 = zz.double()
        assert_close(mean, z64.mean(dim=(0, 2, 3)), zz.dtype, name="mean")
        assert_close(var, z64.var(dim=(0, 2, 3), unbiased=False), zz.dtype, name="var")


def test_bad_inputs_name_the_argument():
    w = randn(4, 3, 3, 3)
    x = randn(2, 3, 5, 5)
    op = fastbig.ops.conv_bn_act
    with pytest.raises(ValueError, match="x must have 3 channels.*got 5"):
        op(randn(2, 5, 5, 5), w)
    with pytest.raises(ValueError, match="x must be 4-D.*got 3-D"):
        op(randn(3, 5, 5), w)
    with pytest.raises(TypeError, match="conv_weight has dtype torch.float64 but x has torch.float32"):
        op(x, w.double())
    with pytest.raises(RuntimeError, match="conv_weight is on meta but x is on cpu"):
        op(x, w.to("meta"))
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        op(x.long(), w)
    with pytest.raises(ValueError, match=r"eps must be a number > 0, got 0"):
        op(x, w, eps=0)
    with pytest.raises(ValueError, match=r"eps must be a number > 0, got -1"):
        op(x, w, eps=-1e-5, training=False, running_mean=torch.zeros(4), running_var=torch.ones(4))
    with pytest.raises(ValueError, match=r"bn_weight must have shape \(4,\).*got \(3,\)"):
        op(x, w, None, randn(3))
    with pytest.raises(RuntimeError, match="running_mean is on meta"):
        op(x, w, None, None, None, torch.zeros(4, device="meta"), torch.ones(4))
    with pytest.raises(ValueError, match="activation must be one of"):
        op(x, w, activation="gelu")
    with pytest.raises(ValueError, match="negative_slope must be a number > 0"):
        op(x, w, activation="leaky_relu", negative_slope=-0.1)
    with pytest.raises(ValueError, match="momentum must be a number in"):
        op(x, w, momentum=2.0)
    block = ConvBnReLU2d(3, 4, 3)
    # the block raises what torch's Sequential(conv, bn, relu) raises here (its conv: RuntimeError)
    with pytest.raises(RuntimeError, match="input must have 3 channels, got 4"):
        block(randn(2, 4, 5, 5))
    with pytest.raises(RuntimeError, match="input must have 3 channels, got 4"):
        block.eval()(randn(2, 4, 5, 5))
    with pytest.raises(RuntimeError, match="Given groups=1.*3 channels"):
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())(randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        fastbig.ops.bn_act(randn(1, 3, 1, 1))
    with pytest.raises(RuntimeError, match="z must be 4-D"):
        torch.ops.fastbig.bn_act_forward(randn(3, 4), None, None, 1e-5, 1, 0.0)
    with pytest.raises(RuntimeError, match="eps must be > 0"):
        torch.ops.fastbig.bn_act_forward(randn(3, 4, 2, 2), None, None, 0.0, 1, 0.0)


def test_reference_backend_forced_and_fallback_agree():
    block, cin, (H, W) = _make("leaky_depthwise")
    twin = copy.deepcopy(block)
    x = randn(3, cin, H, W)
    y = block.train()(x)
    with fastbig.backends.use("reference"):
        y_ref = twin.train()(x)
    assert_close(y, y_ref.double())
    assert_close(block.bn.running_var, twin.bn.running_var.double())
    with fastbig.backends.use("cuda"), pytest.raises(RuntimeError, match="backend 'cuda'"):
        block(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_low_precision_and_float64_kernels(dtype):
    z = randn(4, 5, 6, 7, dtype=dtype, requires_grad=True)
    w, b = randn(5, requires_grad=True), randn(5, requires_grad=True)
    y = fastbig.ops.bn_act(z, w, b, activation="leaky_relu", negative_slope=0.1)
    z64 = z.detach().double().requires_grad_(True)
    w64, b64 = w.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    y64, _ = ref.bn_act(z64, w64, b64, act="leaky_relu", negative_slope=0.1)
    assert y.dtype == dtype
    assert_close(y, y64, dtype)
    dy = randn(*y.shape, dtype=dtype)
    grads64 = torch.autograd.grad(y64, (z64, w64, b64), dy.double())
    for a, r, n in zip(torch.autograd.grad(y, (z, w, b), dy), grads64, "zwb"):
        assert_close(a, r, dtype, name=f"grad {n}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 13, 7, 13), (2, 3, 7, 13), (2, 37, 5, 3)])
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "none"])
def test_cpu_bn_act_channels_last_backward_vs_float64_oracle(dtype, shape, act):
    """The channels_last backward (AVX2-cloned row loops over channels): odd channel counts
    (3, 13, 37), N 1, 7x13 pixels, every activation; y, dz, dgamma, dbeta vs the float64 oracle,
    dz in channels_last, outputs start as NaN."""
    z = randn(*shape, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    C = shape[1]
    w, b = randn(C, requires_grad=True), randn(C, requires_grad=True)
    with nan_poisoned_empty():
        y = fastbig.ops.bn_act(z, w, b, activation=act, negative_slope=0.3)
        dy = randn(*shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
        grads = torch.autograd.grad(y, (z, w, b), dy)
    z64 = z.detach().double().requires_grad_(True)
    w64, b64 = w.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    y64, _ = ref.bn_act(z64, w64, b64, act=act, negative_slope=0.3)
    assert_close(y, y64, dtype)
    assert grads[0].is_contiguous(memory_format=torch.channels_last)
    for a, r, n in zip(grads, torch.autograd.grad(y64, (z64, w64, b64), dy.double()), "zwb"):
        assert_close(a, r, dtype, name=f"grad {n}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 6, 7, 13), (1, 9, 71, 67)])
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "none"])
def test_cpu_bn_act_nchw_both_schedules_vs_float64_oracle(dtype, shape, act):
    """NCHW runs one task per channel (statistics then normalize; sums then dz) when there are
    >= 4 channels per thread, else the two-pass schedule: C 6 and 9 take the first at 1 thread
    and the second at 4 (71x67 planes: several 4096-element chunks). Both vs the float64
    oracle, outputs start as NaN, and the two schedules agree bit for bit."""
    C = shape[1]
    z = randn(*shape, dtype=dtype, scale=2.0) + 3.0
    w, b = randn(C), randn(C)
    dy = randn(*shape, dtype=dtype)
    z64 = z.double().requires_grad_(True)
    w64, b64 = w.double().requires_grad_(True), b.double().requires_grad_(True)
    y64, _ = ref.bn_act(z64, w64, b64, act=act, negative_slope=0.3)
    g64 = torch.autograd.grad(y64, (z64, w64, b64), dy.double())
    n = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 4):
            torch.set_num_threads(threads)
            zt, wt, bt = (t.clone().requires_grad_(True) for t in (z, w, b))
            with nan_poisoned_empty():
                y = fastbig.ops.bn_act(zt, wt, bt, activation=act, negative_slope=0.3)
                grads = torch.autograd.grad(y, (zt, wt, bt), dy)
            assert_close(y, y64, dtype)
            for a, r, nm in zip(grads, g64, "zwb"):
                assert_close(a, r, dtype, name=f"grad {nm}")
            runs.append((y,) + grads)
    finally:
        torch.set_num_threads(n)
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)


# ---- CUDA: the same checks on the GPU kernels ------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(4, 3, 7, 13), (2, 64, 17, 17), (3, 40, 1, 1), (8, 5, 64, 64)])
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "none"])
def test_cuda_bn_act_vs_float64_oracle(dtype, channels_last, shape, act):
    z = randn(*shape, dtype=dtype, device="cuda")
    if channels_last:
        z = z.to(memory_format=torch.channels_last)
    z.requires_grad_(True)
    C = shape[1]
    w = randn(C, device="cuda", requires_grad=True)
    b = randn(C, device="cuda", requires_grad=True)
    rm, rv, nbt = randn(C, device="cuda"), torch.rand(C, device="cuda") + 0.5, torch.tensor(3, device="cuda")
    z64 = z.detach().double().requires_grad_(True)
    w64, b64 = w.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    y64, new = ref.bn_act(z64, w64, b64, rm.double(), rv.double(), nbt.clone(), momentum=None, act=act,
                          negative_slope=0.2)
    with nan_poisoned_empty(), fastbig.backends.use("cuda"):
        y = fastbig.ops.bn_act(z, w, b, rm, rv, nbt, momentum=None, activation=act, negative_slope=0.2)
    assert y.dtype == dtype
    assert_close(y, y64, dtype)
    assert_close(rm, new.running_mean, torch.float32, name="running_mean")
    assert_close(rv, new.running_var, torch.float32, name="running_var")
    assert int(nbt) == 4
    dy = randn(*shape, dtype=dtype, device="cuda")
    with nan_poisoned_empty():
        g = torch.autograd.grad(y, (z, w, b), dy)
    g64 = torch.autograd.grad(y64, (z64, w64, b64), dy.double())
    for a, r, n in zip(g, g64, "zwb"):
        assert_close(a, r, dtype, name=f"grad {n}")


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["relu3x3_c3", "leaky_depthwise", "transposed_dcgan"])
def test_cuda_blocks_train_eval(name):
    block, cin, (H, W) = _make(name, device="cuda")
    st = _ref_state(block)
    for training in (True, False):
        block.train(training)
        x = randn(4, cin, H, W, device="cuda", requires_grad=True)
        x64 = x.detach().double().requires_grad_(True)
        y = block(x)
        y64, new = _ref_forward(block, st, x64, training)
        if new is not None:
            st.update(running_mean=new.running_mean, running_var=new.running_var,
                      num_batches_tracked=new.num_batches_tracked)
        assert_close(y, y64)
        _grads_close(block, st, x, x64, y, y64, torch.float32, training)
    assert_close(block.bn.running_var, st["running_var"])


def test_frozen_bn_inside_a_training_block_as_torch():
    """The bn's own mode decides, as in nn.Sequential(conv, bn, act): the usual fine-tuning freeze
    (every BatchNorm2d put in eval inside a training model) uses and keeps the running statistics;
    a bn with running statistics whose track_running_stats was turned off uses them in eval."""
    torch.manual_seed(0)
    f = ConvBnLeakyReLU2d(3, 4, 3, padding=1, negative_slope=0.1)
    t = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.LeakyReLU(0.1))
    with torch.no_grad():
        f.bn.running_mean.uniform_(-0.5, 0.5)
        f.bn.running_var.uniform_(0.5, 2.0)
    t.load_state_dict(f.state_dict())
    x = randn(2, 3, 6, 6)
    for m in (f, t):
        m.train()
        for b in m.modules():
            if isinstance(b, nn.BatchNorm2d):
                b.eval()
    rm = f.bn.running_mean.clone()
    y = f(x.requires_grad_())
    assert_close(y, t.double()(x.double()), name="frozen bn")
    assert torch.equal(f.bn.running_mean, rm) and int(f.bn.num_batches_tracked) == 0
    y.sum().backward()
    assert x.grad is not None and f.conv.weight.grad is not None
    f.eval(), t.eval()
    f.bn.track_running_stats = t[1].track_running_stats = False
    assert_close(f(x.detach()), t(x.detach().double()), name="eval, track_running_stats flipped off")


@pytest.mark.parametrize("cls", [ConvBnReLU2d, ConvTransposeBnReLU2d])
def test_empty_batch_in_training_as_torch(cls):
    """N=0 in training: torch's BatchNorm2d gives an empty output, keeps the running statistics,
    counts the batch, and backward gives the weights zero gradients; so does the block."""
    torch.manual_seed(0)
    f = cls(3, 4, 3, padding=1)
    conv = (nn.ConvTranspose2d if cls is ConvTransposeBnReLU2d else nn.Conv2d)(3, 4, 3, padding=1, bias=False)
    t = nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU())
    t.load_state_dict(f.state_dict())
    x = randn(0, 3, 6, 6, requires_grad=True)
    for m in (f, t):
        y = m.train()(x)
        assert y.shape == (0, 4, 6, 6)
        y.sum().backward()
    for (name, pt), pf in zip(t.named_parameters(), f.parameters()):
        assert pf.grad is not None and torch.equal(pf.grad, pt.grad), name
    for (name, bt), bf in zip(t.named_buffers(), f.buffers()):
        assert torch.equal(bf, bt), name
    assert int(f.bn.num_batches_tracked) == 1


def test_leaky_slope_the_kernels_cannot_take_fails_at_construction():
    for slope in (0.0, -0.2):
        with pytest.raises(ValueError, match="negative_slope must be a finite number > 0"):
            ConvBnLeakyReLU2d(3, 4, 3, negative_slope=slope)
        with pytest.raises(ValueError, match="negative_slope must be a finite number > 0"):
            ConvBnLeakyReLU2d.from_modules(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.LeakyReLU(slope))
    ConvBnLeakyReLU2d(3, 4, 3, negative_slope=1.5)


@pytest.mark.parametrize("padding_mode", ["reflect", "circular"])
def test_eval_padding_mode_block_and_conv_act_vs_float64(padding_mode):
    """Eval with running statistics and a padding_mode other than zeros: the block (through
    fastbig.ops.conv_act) matches torch's Sequential, and conv_act pads as nn.Conv2d does,
    "same" padding included."""
    block = ConvBnReLU2d(3, 5, 3, padding=1, padding_mode=padding_mode)
    _randomize_bn(block.bn)
    block.eval()
    seq = _seq_twin(block).double()
    x = randn(2, 3, 6, 7)
    with torch.no_grad():
        assert_close(block(x), seq(x.double()), name="block")
    conv = nn.Conv2d(3, 4, (3, 5), padding="same", dilation=(2, 1), padding_mode=padding_mode, dtype=F64)
    y = fastbig.ops.conv_act(x, conv.weight.float(), conv.bias.float(), padding="same", dilation=(2, 1),
                             padding_mode=padding_mode, activation="leaky_relu", negative_slope=0.2)
    assert_close(y, torch.nn.functional.leaky_relu(conv(x.double()), 0.2), name="same")


def test_conv_act_checks_name_its_arguments():
    x, w = randn(2, 3, 5, 5), randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="conv_act: x must have 3 channels.*got 5"):
        fastbig.ops.conv_act(randn(2, 5, 5, 5), w)
    with pytest.raises(fastbig.errors.DtypeError, match="conv_act: weight has dtype torch.float64"):
        fastbig.ops.conv_act(x, w.double())
    with pytest.raises(ValueError, match="conv_act: bias must have shape \\(4,\\)"):
        fastbig.ops.conv_act(x, w, randn(3))
    with pytest.raises(ValueError, match="conv_act: activation must be one of"):
        fastbig.ops.conv_act(x, w, activation="gelu")
    with pytest.raises(ValueError, match="padding_mode must be"):
        fastbig.ops.conv_act(x, w, padding_mode="mirror")
    # the block runs the unchecked form, which still checks a transposed conv's output_padding
    block = ConvTransposeBnReLU2d(3, 4, 3, stride=1, output_padding=1).eval()
    with pytest.raises(RuntimeError, match="output_padding must be >= 0 and smaller than either stride"):
        block(randn(1, 3, 5, 5))


def test_conv_act_calls_packed_only_on_the_prepacked_onednn_path(monkeypatch):
    """``packed`` supplies the prepacked weight for a channels_last input on oneDNN's path, and
    is not called for an NCHW input."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN not built")
    x, w, b = randn(2, 8, 12, 12), randn(16, 8, 3, 3), randn(16)
    asked = []

    def packed():
        asked.append(1)
        return fastbig.ops.conv_bn_relu.onednn_pack_conv_weight(w, 1, 1, 1, 1, x.shape)
    with torch.no_grad():
        y0 = fastbig.ops.conv_act(x, w, b, padding=1, packed=packed)
        assert asked == []
        y1 = fastbig.ops.conv_act(x.to(memory_format=torch.channels_last), w, b, padding=1, packed=packed)
    assert asked == [1]
    y64 = torch.relu(torch.nn.functional.conv2d(x.double(), w.double(), b.double(), padding=1))
    assert_close(y0, y64, name="NCHW")
    assert_close(y1, y64, name="channels_last, packed")
