"""fastbig.models: each fused model equals its torch.nn twin (fused=False) that loads the fused
model's state_dict with strict=True: outputs, parameter gradients and running statistics, in
train and eval mode; and one optimizer step on the fused model lowers its loss."""
import pytest
import torch
from torch.nn import functional as F

import fastbig.models as M
from conftest import TOL, assert_close, param_grad_errors, randn

B = 3  # an odd batch


def _digits_img(size=8, ch=1):
    return (randn(B, ch, size, size),)


def _tokens(vocab, T, lo=0):
    return torch.randint(lo, vocab, (B, T))


def _ce(out, y=None):
    y = torch.randint(0, out.shape[-1], out.shape[:-1]) if y is None else y
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _kpm(T):
    m = torch.zeros(B, T, dtype=torch.bool)
    m[1, T - 2:] = True  # row 1: the last two positions are padding
    return m


# name -> (builder(fused), inputs(), loss(out))
CASES = {
    "SimpleCNN": (lambda f: M.SimpleCNN(in_channels=1, num_classes=10, image_size=8, fused=f),
                  _digits_img, _ce),
    "BigModel": (lambda f: M.BigModel(in_channels=3, num_classes=10, image_size=6, hidden=37, fused=f),
                 lambda: _digits_img(6, 3), _ce),
    "MNISTNet": (lambda f: M.MNISTNet(fused=f), _digits_img, _ce),
    "MLP": (lambda f: M.MLP(in_features=64, fused=f), _digits_img, _ce),
    "Autoencoder": (lambda f: M.Autoencoder(in_features=64, fused=f),
                    lambda: (torch.rand(B, 1, 8, 8) * 0.9 + 0.05,), lambda out: F.mse_loss(out, torch.rand_like(out))),
    "WideDeep": (lambda f: M.WideDeep(num_dense=4, cardinalities=(5, 7), fused=f),
                 lambda: (randn(B, 4), torch.stack([torch.randint(0, 5, (B,)), torch.randint(0, 7, (B,))], 1)),
                 lambda out: F.binary_cross_entropy_with_logits(out, torch.rand_like(out).round())),
    "LSTMClassifier": (lambda f: M.LSTMClassifier(input_size=3, hidden_size=17, num_layers=2,
                                                  num_classes=4, fused=f),
                       lambda: (randn(B, 7, 3),), _ce),
    "LSTMClassifier-packed": (lambda f: M.LSTMClassifier(vocab_size=11, embed_dim=6, hidden_size=9,
                                                         num_classes=3, fused=f),
                              lambda: (_tokens(11, 6), torch.tensor([6, 2, 5])), _ce),
    "SelfAttention": (lambda f: M.SelfAttention(input_size=5, embed_dim=16, num_classes=4, max_len=16,
                                                fused=f),
                      lambda: (randn(B, 9, 5), _kpm(9)), _ce),
    "SelfAttention-causal-tokens": (lambda f: M.SelfAttentionClassifier(vocab_size=13, embed_dim=8,
                                                                        num_classes=3, causal=True, fused=f),
                                    lambda: (_tokens(13, 5),), _ce),
    "Transformer": (lambda f: M.Transformer(src_vocab=11, tgt_vocab=9, d_model=16, nhead=2,
                                            num_encoder_layers=1, num_decoder_layers=2,
                                            dim_feedforward=24, max_len=16, fused=f),
                    lambda: (_tokens(11, 7), _tokens(9, 5), _kpm(7)), _ce),
    "BertEncoder": (lambda f: M.BertEncoder(vocab_size=23, hidden_size=16, num_layers=2, num_heads=2,
                                            intermediate_size=32, max_position=16, dropout=0.0,
                                            num_classes=3, fused=f),
                    lambda: (_tokens(23, 6), (~_kpm(6)).long()), _ce),
    "DCGAN-generator": (lambda f: M.DCGAN(nz=5, ngf=4, ndf=4, image_size=16, fused=f),
                        lambda: (randn(B, 5),), lambda out: F.mse_loss(out, torch.rand_like(out) * 2 - 1)),
    "DCGAN-discriminator": (lambda f: M.Discriminator(ndf=4, nc=1, image_size=8, fused=f),
                            lambda: (randn(B, 1, 8, 8),),
                            lambda out: F.binary_cross_entropy(out, torch.rand_like(out).round())),
    "resnet18": (lambda f: M.resnet18(width=4, in_channels=1, num_classes=5, small_input=True, fused=f),
                 lambda: _digits_img(8), _ce),
    "resnet34": (lambda f: M.resnet34(width=2, in_channels=3, num_classes=5, fused=f),
                 lambda: _digits_img(17, 3), _ce),
}


# Deep BatchNorm stacks in train mode on tiny batches are ill-conditioned: there even the torch.nn
# twin run in float32 is ~1e-4 from its float64 self, over TOL[float32]. Those cases run the fused
# model in float64 (which its kernels support) and are held to TOL[float64].
FLOAT64 = {"resnet18", "resnet34"}


def _randomize_state(model):
    """Fresh random BatchNorm affine parameters and running statistics (never the init's 1/0)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand_like(m.weight) + 0.5)
                m.bias.copy_(torch.randn_like(m.bias) * 0.2)
                m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.1)
                m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)


def _pair(name):
    build, inputs, loss = CASES[name]
    torch.manual_seed(1)
    fused = build(True)
    _randomize_state(fused)
    twin = build(False)
    twin.load_state_dict(fused.state_dict(), strict=True)
    dtype = torch.float64 if name in FLOAT64 else torch.float32
    return fused.to(dtype), twin.double(), inputs, loss, dtype


def _run(model, args, seed, grad_out=None, dtype=None):
    torch.manual_seed(seed)
    if dtype is not None:
        args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
    out = model(*args)
    if grad_out is not None:
        out.backward(grad_out.to(out.dtype))
    return out


def _f64(args):
    return tuple(a.double() if a.is_floating_point() else a for a in args)


def _check_grads(label, fused, ref, dtype):
    """Per-parameter relative error vs the float64 twin. A gradient that is zero in exact
    arithmetic (e.g. the key bias of softmax attention) has no relative error to speak of; those
    (reference norm under 1e-6 of all gradients' norm) are held to TOL times the total norm."""
    for pname, err in param_grad_errors(fused, ref).items():
        assert err <= TOL[dtype], f"{label} grad {pname}: relative error {err:.3e} > {TOL[dtype]:.1e}"


@pytest.mark.parametrize("name", list(CASES))
def test_fused_equals_twin_and_trains(name):
    """Fused model (float32) vs its torch.nn twin computed in float64 from the same weights and
    inputs: outputs, gradients, running statistics, train then eval mode. Then one SGD step on
    the fused model lowers its loss on the same batch."""
    fused, ref, inputs, loss_fn, dtype = _pair(name)
    assert list(fused.state_dict().keys()) == list(ref.state_dict().keys())
    args = inputs()
    for mode in (True, False):
        label = f"{name} {'train' if mode else 'eval'}"
        fused.train(mode)
        ref.train(mode)
        fused.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        out_r = _run(ref, _f64(args), seed=7)
        g = randn(*out_r.shape)
        out_r.backward(g.double())
        out_f = _run(fused, args, seed=7, grad_out=g, dtype=dtype)
        assert out_f.dtype == dtype
        assert_close(out_f, out_r, dtype, name=f"{label} output")
        _check_grads(label, fused, ref, dtype)
        rb = dict(ref.named_buffers())
        for bname, b in fused.named_buffers():
            if b.is_floating_point():
                assert_close(b, rb[bname], dtype, name=f"{label} buffer {bname}")
            else:
                assert torch.equal(b, rb[bname]), f"{label} buffer {bname}"

    # one training step lowers the loss (same batch, same dropout masks, same random target)
    fused.train()

    def loss():
        torch.manual_seed(3)
        out = fused(*(a.to(dtype) if a.is_floating_point() else a for a in args))
        torch.manual_seed(4)
        return loss_fn(out)

    opt = torch.optim.SGD(fused.parameters(), lr=0.05)
    opt.zero_grad()
    loss0 = loss()
    loss0.backward()
    opt.step()
    with torch.no_grad():
        loss1 = loss()
    assert torch.isfinite(loss1)
    assert loss1.item() < loss0.item(), f"{name}: loss {loss0.item():.5f} -> {loss1.item():.5f}"


def test_old_model_name_is_an_alias():
    """models.SelfAttention (a classifier, beside the layer fastbig.nn.SelfAttention) is the old
    name of models.SelfAttentionClassifier."""
    assert M.SelfAttention is M.SelfAttentionClassifier and "SelfAttention" in M.__all__


def test_twin_is_plain_torch():
    """fused=False holds no fastbig module: the conv blocks are nn.Sequential(Conv2d, BN, ReLU)."""
    twin = M.resnet18(width=4, in_channels=1, num_classes=3, small_input=True, fused=False)
    assert not any(type(m).__module__.startswith("fastbig.nn") for m in twin.modules())
    block = twin.layer1[0].conv1
    assert type(block) is torch.nn.Sequential
    assert [type(m) for m in block] == [torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU]
    fused = M.resnet18(width=4, in_channels=1, num_classes=3, small_input=True, fused=True)
    import fastbig.nn as fnn
    assert isinstance(fused.layer1[0].conv1, fnn.ConvBnReLU2d)
    assert isinstance(fused.layer1[0].conv2, fnn.ConvBn2d)
    t = M.Transformer(d_model=8, nhead=2, fused=True)
    assert isinstance(t.encoder[0].self_attn, fnn.MultiheadAttention)
    assert isinstance(M.LSTMClassifier(input_size=2, fused=True).lstm, fnn.LSTM)
    assert isinstance(M.DCGAN(fused=True).generator.net[0], fnn.ConvTransposeBnReLU2d)
    assert isinstance(M.DCGAN(fused=True).discriminator.net[2], fnn.ConvBnLeakyReLU2d)


@pytest.mark.parametrize("bad", [
    lambda: M.MNISTNet(image_size=3),
    lambda: M.SimpleCNN(image_size=7),
    lambda: M.ResNet(layers=(2, 2), width=4),
    lambda: M.Transformer(d_model=10, nhead=3),
    lambda: M.BertEncoder(hidden_size=10, num_heads=3),
    lambda: M.LSTMClassifier(),
    lambda: M.LSTMClassifier(input_size=3, vocab_size=5),
    lambda: M.DCGAN(image_size=12),
])
def test_bad_configs_raise(bad):
    with pytest.raises(ValueError):
        bad()


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="categorical"):
        M.WideDeep(num_dense=2, cardinalities=(3, 3), fused=False)(randn(2, 2), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        M.BertEncoder(vocab_size=5, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8,
                      fused=False)(torch.ones(2, 4, dtype=torch.long), torch.ones(2, 3))
    with pytest.raises(ValueError, match="max_len"):
        M.Transformer(d_model=8, nhead=2, max_len=4, fused=False)(torch.ones(1, 5, dtype=torch.long),
                                                                  torch.ones(1, 2, dtype=torch.long))
